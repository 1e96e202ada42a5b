//! The Kubernetes name grammars a connector's namespace and name follow.

/// RFC 1123 label: Kubernetes namespaces (and each part of a subdomain).
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || *x == b'-')
        && b.first().is_some_and(|x| *x != b'-')
        && b.last().is_some_and(|x| *x != b'-')
}

/// RFC 1123 subdomain: Kubernetes object names.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_subdomains() {
        for ok in ["a", "demo", "team-a", "a1", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert!(is_dns_subdomain("registry.v2"));
        assert!(!is_dns_subdomain("registry..v2"));
        assert!(!is_dns_subdomain(&format!("{}.{}", "a".repeat(63), "b".repeat(190))));
    }
}
