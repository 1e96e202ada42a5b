//! The path router: any path, any query; no panic, and a parsed repository always satisfies
//! the name grammar it was checked against.
#![no_main]
use connector_filter::route::{V2Path, classify, is_repository_name, parse_path_form, parse_repo_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    let (p, q) = path.split_once('?').unwrap_or((path, ""));
    if let V2Path::Below(rest) = classify(p) {
        if let Ok((ns, name, req)) = parse_path_form(rest) {
            assert!(!ns.is_empty() && !name.is_empty());
            assert!(is_repository_name(req.repository), "{:?}", req.repository);
        }
        if let Ok(req) = parse_repo_request(rest) {
            assert!(is_repository_name(req.repository), "{:?}", req.repository);
            let _ = connector_filter::engine::map_mount_query(q, "/v2/namespaces/demo/connectors/registry");
        }
    }
});
