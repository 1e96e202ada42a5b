//! Docker Hub's several names, as clients and credential files write them.

/// Names clients use for Docker Hub; credentials and images filed under any of them are Docker
/// Hub's. `registry.hub.docker.com` is the v1 name some old `config.json` files still carry.
pub const DOCKER_HUB_ALIASES: [&str; 4] = [
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
];

/// Whether `host` (lowercase) is one of Docker Hub's names.
pub fn is_docker_hub(host: &str) -> bool {
    DOCKER_HUB_ALIASES.contains(&host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_names() {
        assert!(is_docker_hub("registry-1.docker.io"));
        assert!(!is_docker_hub("ghcr.io"));
    }
}
