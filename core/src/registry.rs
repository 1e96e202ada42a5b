//! Registry host names as clients write them: Docker Hub's several names, and the host a docker
//! `config.json` `auths` key names.

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

/// The `host[:port]` a docker config `auths` key names: keys come as `host`, `host:port`,
/// `https://host/v1/` (what `docker login` writes for Docker Hub) and so on.
pub fn docker_config_host(key: &str) -> String {
    let rest = key.split_once("://").map_or(key, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or(rest).to_ascii_lowercase();
    host.strip_suffix(":443").unwrap_or(&host).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auths_keys() {
        assert_eq!(docker_config_host("https://index.docker.io/v1/"), "index.docker.io");
        assert_eq!(docker_config_host("Harbor.Example.com:443"), "harbor.example.com");
        assert_eq!(docker_config_host("registry:5000"), "registry:5000");
        assert!(is_docker_hub("registry-1.docker.io"));
        assert!(!is_docker_hub("ghcr.io"));
    }
}
