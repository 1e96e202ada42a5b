//! What a request does through a connector, and the RBAC verb on `connectors.alauda.io`
//! `connectors` that grants it: the filter names it on the controller channel, the controller
//! and the webhook ask Kubernetes for it.

/// What a request does through a connector, as RBAC mode asks about it: a pull grant must not
/// also let its holder push or delete with the robot's rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// GET, HEAD.
    Pull,
    /// POST, PUT, PATCH: uploads, manifests, tags.
    Push,
    /// DELETE of a manifest, blob or upload.
    Delete,
}

impl Verb {
    pub fn of_method(method: &str) -> Verb {
        match method {
            "GET" | "HEAD" => Verb::Pull,
            "DELETE" => Verb::Delete,
            _ => Verb::Push,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Pull => "pull",
            Verb::Push => "push",
            Verb::Delete => "delete",
        }
    }

    /// The RBAC verb on `connectors.alauda.io` `connectors` that grants this (the controller's
    /// SubjectAccessReview asks for it). `get` for pull keeps the contract users know; push and
    /// delete have verbs of their own, so neither a pull grant nor the right to delete the
    /// Connector object grants them.
    pub fn rbac_verb(self) -> &'static str {
        match self {
            Verb::Pull => "get",
            Verb::Push => "push",
            Verb::Delete => "delete-artifacts",
        }
    }

    pub fn parse(s: &str) -> Option<Verb> {
        match s {
            "pull" => Some(Verb::Pull),
            "push" => Some(Verb::Push),
            "delete" => Some(Verb::Delete),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Verb;

    #[test]
    fn methods_names_and_rbac_verbs() {
        for (method, verb, name, rbac) in [
            ("GET", Verb::Pull, "pull", "get"),
            ("HEAD", Verb::Pull, "pull", "get"),
            ("PUT", Verb::Push, "push", "push"),
            ("PATCH", Verb::Push, "push", "push"),
            ("DELETE", Verb::Delete, "delete", "delete-artifacts"),
        ] {
            assert_eq!(Verb::of_method(method), verb);
            assert_eq!(verb.as_str(), name);
            assert_eq!(Verb::parse(name), Some(verb));
            assert_eq!(verb.rbac_verb(), rbac);
        }
        assert_eq!(Verb::parse("get"), None);
    }
}
