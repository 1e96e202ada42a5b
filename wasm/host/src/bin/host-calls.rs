//! Prints the proxy-wasm host calls of one warm forwarded request (see `connector_wasm_host::warm`):
//! `host-calls [module.wasm]`, the release filter module by default. `make bench` prints the count.

use std::process::ExitCode;

fn main() -> ExitCode {
    let module = std::env::args().nth(1).map(std::path::PathBuf::from);
    match connector_wasm_host::warm::warm_forwarded_request(module) {
        Ok(w) => {
            println!(
                "{} host calls ({} request phase: {}; {} response phase: {})",
                w.total(),
                w.request.len(),
                w.request.join(" "),
                w.response.len(),
                w.response.join(" ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("host-calls: {e:#}");
            ExitCode::FAILURE
        }
    }
}
