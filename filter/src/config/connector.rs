//! One `connectors[i]` entry: names, upstream, cluster, host names, allow lists, token realms,
//! and its revision (a hash of the whole entry, which the caches are keyed by).

use serde_json::Value;

use super::*;

pub(super) fn check_host_pattern(w: &mut Walk<'_>, pattern: &str) {
    for problem in connector_core::host::pattern_problems(pattern) {
        w.err("proxy.hostPattern", problem);
    }
}

pub(super) fn compile_connector(
    w: &mut Walk<'_>,
    v: &Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    has_controller: bool,
) -> Option<Connector> {
    let known = [
        "namespace",
        "name",
        "address",
        "cluster",
        "credential",
        "allowedNamespaces",
        "allowedServiceAccounts",
        "hosts",
        "tokenRealms",
        "readOnly",
    ];
    let m = w.object(Some(v), path, &known, true)?;
    let read_only = match m.get("readOnly") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            w.err(format!("{path}.readOnly"), "expected true or false");
            false
        }
    };
    let namespace = w.string(m, path, "namespace", true);
    if let Some(ns) = namespace
        && !is_dns_label(ns)
    {
        w.err(
            format!("{path}.namespace"),
            "expected a Kubernetes namespace name (RFC 1123 label)",
        );
    }
    let name = w.string(m, path, "name", true);
    if let Some(n) = name
        && !is_dns_subdomain(n)
    {
        w.err(
            format!("{path}.name"),
            "expected a Kubernetes object name (RFC 1123 subdomain)",
        );
    }
    let upstream = w
        .string(m, path, "address", true)
        .and_then(|a| match Upstream::parse(a) {
            Ok(u) => Some(u),
            Err(e) => {
                w.err(format!("{path}.address"), e);
                None
            }
        });
    let cluster = w.string(m, path, "cluster", true);
    // '|' is in the names Istio gives clusters (`outbound|443||registry.example.com`), which a
    // controller in an Istio gateway names (`--istio-wasmplugin`); none of these characters can
    // end or split the `x-oci-connector-cluster` header value.
    if let Some(c) = cluster
        && !c
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'|'))
    {
        w.err(
            format!("{path}.cluster"),
            "expected an Envoy cluster name (letters, digits, '_', '-', '.', ':', '|')",
        );
    }
    let authorization = compile_credential(
        w,
        m.get("credential"),
        &format!("{path}.credential"),
        upstream.as_ref(),
        env,
        has_controller,
    );
    let token_realms = compile_token_realms(w, m.get("tokenRealms"), &format!("{path}.tokenRealms"));

    let allowed_namespaces = w.strings(m, path, "allowedNamespaces", false);
    for (i, ns) in allowed_namespaces.iter().enumerate() {
        if !is_dns_label(ns) {
            w.err(
                format!("{path}.allowedNamespaces[{i}]"),
                "expected a Kubernetes namespace name",
            );
        }
    }
    let mut allowed_service_accounts = HashSet::new();
    for (i, sa) in w.strings(m, path, "allowedServiceAccounts", false).iter().enumerate() {
        match sa.split_once('/') {
            Some((ns, name)) if is_dns_label(ns) && is_dns_subdomain(name) => {
                allowed_service_accounts.insert((ns.to_string(), name.to_string()));
            }
            _ => w.err(
                format!("{path}.allowedServiceAccounts[{i}]"),
                "expected <namespace>/<serviceaccount>",
            ),
        }
    }
    let hosts: Vec<String> = w
        .strings(m, path, "hosts", false)
        .into_iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        if !is_dns_subdomain(h) {
            w.err(format!("{path}.hosts[{i}]"), "expected a host name without port");
        }
    }
    Some(Connector {
        namespace: namespace?.to_string(),
        name: name?.to_string(),
        upstream: upstream?,
        cluster: cluster?.to_string(),
        credential: authorization?,
        allowed_namespaces: allowed_namespaces.into_iter().collect(),
        allowed_service_accounts,
        hosts,
        token_realms,
        read_only,
        revision: content_hash(v),
    })
}

/// A stable hash of a JSON value (serde_json's maps are sorted, so equal documents hash equal).
pub(super) fn content_hash(v: &Value) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    // SipHash with fixed keys: the same entry gets the same revision in every VM of a build.
    let mut h = std::hash::DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

/// `tokenRealms: [{"url": "https://auth.example.com/token", "cluster": "auth_example"}]`.
pub(super) fn compile_token_realms(w: &mut Walk<'_>, v: Option<&Value>, path: &str) -> Vec<TokenRealm> {
    let items = match v {
        None => return vec![],
        Some(Value::Array(items)) => items,
        Some(_) => {
            w.err(path, "expected a list of {\"url\": ..., \"cluster\": ...}");
            return vec![];
        }
    };
    let mut out = vec![];
    for (i, item) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let Some(m) = w.object(Some(item), &p, &["url", "cluster"], true) else {
            continue;
        };
        let url = w.string(m, &p, "url", true);
        let cluster = w.string(m, &p, "cluster", true);
        let parsed = url.and_then(|u| {
            let parsed = crate::upstream::split_url(u);
            if parsed.is_none() {
                w.err(
                    format!("{p}.url"),
                    "expected the realm URL as the upstream's challenge names it: http(s)://host[:port]/path",
                );
            }
            parsed
        });
        if let (Some((scheme, authority, rpath)), Some(cluster)) = (parsed, cluster) {
            out.push(TokenRealm {
                scheme,
                authority,
                path: rpath,
                cluster: cluster.to_string(),
            });
        }
    }
    out
}
