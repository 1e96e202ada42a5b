//! The host form of a connector's address: `proxy.hostPattern` with `{name}` and `{namespace}`,
//! rendered for one connector (filter, webhook, credential provider, client configs) and matched
//! against a request's host (the filter answers a host of that shape as a forbidden connector, not
//! as "not a connector address").

pub const DEFAULT_HOST_PATTERN: &str = "c-{name}-connector.{namespace}.svc.cluster.local";

/// Renders the host pattern for one connector. One pass, one allocation: a configuration of
/// 20,000 connectors renders every host name on each push.
pub fn render_host(pattern: &str, namespace: &str, name: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + namespace.len() + name.len());
    let mut rest = pattern;
    while let Some(at) = rest.find('{') {
        let (head, tail) = rest.split_at(at);
        out.push_str(head);
        if let Some(after) = tail.strip_prefix("{namespace}") {
            out.push_str(namespace);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{name}") {
            out.push_str(name);
            rest = after;
        } else {
            out.push('{');
            rest = tail.get(1..).unwrap_or_default();
        }
    }
    out.push_str(rest);
    out
}

/// What is wrong with a host pattern, one message per problem (empty: it is usable).
pub fn pattern_problems(pattern: &str) -> Vec<&'static str> {
    let mut problems = Vec::new();
    if pattern.matches("{name}").count() != 1 || pattern.matches("{namespace}").count() != 1 {
        problems.push(
            "must contain {name} and {namespace} exactly once, e.g. c-{name}-connector.{namespace}.svc.cluster.local",
        );
    }
    let literal = pattern.replace("{namespace}", "").replace("{name}", "");
    if !literal
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        problems
            .push("may only contain lowercase letters, digits, '-', '.' and the placeholders {name} and {namespace}");
    }
    problems
}

/// Whether `host` (lowercase, no port) has the shape `pattern` gives: `{name}` matches
/// `[a-z0-9.-]+`, `{namespace}` matches `[a-z0-9-]+`, the rest literally.
pub fn matches_pattern(pattern: &str, host: &str) -> bool {
    pattern_matches(pattern.as_bytes(), host.as_bytes())
}

fn pattern_matches(pattern: &[u8], host: &[u8]) -> bool {
    let placeholder = |p: &[u8]| -> Option<(usize, bool)> {
        if p.starts_with(b"{name}") {
            Some((6, true))
        } else if p.starts_with(b"{namespace}") {
            Some((11, false))
        } else {
            None
        }
    };
    match (pattern.first(), placeholder(pattern)) {
        (None, _) => host.is_empty(),
        (Some(_), Some((len, dots))) => {
            let rest = pattern.get(len..).unwrap_or_default();
            let ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || (dots && *b == b'.');
            let mut i = 0;
            while host.get(i).is_some_and(ok) {
                i += 1;
                if pattern_matches(rest, host.get(i..).unwrap_or_default()) {
                    return true;
                }
            }
            false
        }
        (Some(p), None) => {
            host.first() == Some(p)
                && pattern_matches(pattern.get(1..).unwrap_or_default(), host.get(1..).unwrap_or_default())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_each_placeholder_where_it_stands() {
        assert_eq!(render_host("{name}.{namespace}.x", "ns", "n"), "n.ns.x");
        assert_eq!(
            render_host("x-{namespace}-{name}", "team-a", "reg.v2"),
            "x-team-a-reg.v2"
        );
        // Not a placeholder: kept as written (a pattern with one is refused by `pattern_problems`).
        assert_eq!(render_host("{nam}{name}{", "ns", "n"), "{nam}n{");
    }

    #[test]
    fn renders_and_matches_the_default_pattern() {
        let host = render_host(DEFAULT_HOST_PATTERN, "team-a", "harbor.v2");
        assert_eq!(host, "c-harbor.v2-connector.team-a.svc.cluster.local");
        assert!(matches_pattern(DEFAULT_HOST_PATTERN, &host));
        assert!(!matches_pattern(
            DEFAULT_HOST_PATTERN,
            "c-x-connector.team.a.svc.cluster.local"
        ));
        assert!(!matches_pattern(
            DEFAULT_HOST_PATTERN,
            "c--connector.demo.svc.cluster.local"
        ));
        assert!(!matches_pattern(DEFAULT_HOST_PATTERN, "registry.example.com"));
    }

    #[test]
    fn reports_every_problem_of_a_pattern() {
        assert!(pattern_problems(DEFAULT_HOST_PATTERN).is_empty());
        assert_eq!(pattern_problems("{name}.Example.com").len(), 2);
        assert_eq!(pattern_problems("{name}{name}.{namespace}").len(), 1);
    }
}
