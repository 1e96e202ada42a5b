//! `connector-controller`: `crd` prints the CRD; `render` turns a directory of manifests into
//! the filter configuration, its env file and the Envoy clusters it needs.

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("crd") => match connector_controller::crd::crd_yaml() {
            Ok(y) => print!("{y}"),
            Err(e) => {
                eprintln!("connector-controller crd: {e}");
                std::process::exit(1);
            }
        },
        _ => {
            eprintln!("usage: connector-controller crd");
            std::process::exit(2);
        }
    }
}
