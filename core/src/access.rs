//! The access rule of rules mode: a ServiceAccount may use the connectors of its own namespace,
//! and a connector may also admit other namespaces and single ServiceAccounts. The filter decides
//! requests by it and the webhook decides pods by it, so both must read it from here.

/// A connector's allow lists, as each holder stores them.
pub trait AllowLists {
    fn allows_namespace(&self, namespace: &str) -> bool;
    fn allows_service_account(&self, namespace: &str, service_account: &str) -> bool;
}

/// Whether the ServiceAccount `namespace/service_account` may use a connector of
/// `connector_namespace` with these lists.
pub fn admits(connector_namespace: &str, lists: &impl AllowLists, namespace: &str, service_account: &str) -> bool {
    namespace == connector_namespace
        || lists.allows_namespace(namespace)
        || lists.allows_service_account(namespace, service_account)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Lists(&'static [&'static str], &'static [(&'static str, &'static str)]);
    impl AllowLists for Lists {
        fn allows_namespace(&self, ns: &str) -> bool {
            self.0.contains(&ns)
        }
        fn allows_service_account(&self, ns: &str, sa: &str) -> bool {
            self.1.contains(&(ns, sa))
        }
    }

    #[test]
    fn own_namespace_then_the_lists() {
        let lists = Lists(&["ci"], &[("build", "kaniko")]);
        assert!(admits("demo", &lists, "demo", "default"));
        assert!(admits("demo", &lists, "ci", "anyone"));
        assert!(admits("demo", &lists, "build", "kaniko"));
        assert!(!admits("demo", &lists, "build", "default"));
        assert!(!admits("demo", &lists, "other", "kaniko"));
    }
}
