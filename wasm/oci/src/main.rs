//! `wasm-oci package --module <file.wasm> --out <layout dir> [--tag 0.1.0]`: writes the filter
//! as a Wasm OCI artifact layout and prints the digests (push it with
//! `skopeo copy oci:<dir>:<tag> docker://<registry>/<repo>:<tag>`).

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: wasm-oci package --module <file.wasm> --out <layout dir> [--tag 0.1.0]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("package") {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let (mut module, mut out, mut tag) = (None, None, "0.1.0".to_string());
    let mut it = args.iter().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().cloned();
        match (flag.as_str(), value) {
            ("--module", Some(v)) => module = Some(PathBuf::from(v)),
            ("--out", Some(v)) => out = Some(PathBuf::from(v)),
            ("--tag", Some(v)) => tag = v,
            _ => {
                eprintln!("wasm-oci: bad argument {flag:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let (Some(module), Some(out)) = (module, out) else {
        eprintln!("wasm-oci: --module and --out are required\n{USAGE}");
        return ExitCode::from(2);
    };
    let bytes = match std::fs::read(&module) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("wasm-oci: read {}: {e}", module.display());
            return ExitCode::FAILURE;
        }
    };
    match connector_wasm_oci::write_layout(&bytes, &out, &tag) {
        Ok(a) => {
            println!("layout   {}:{tag}", out.display());
            println!("manifest {}", a.manifest_digest);
            println!("module   {} ({} bytes)", a.layer_digest, a.layer_size);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wasm-oci: {e}");
            ExitCode::FAILURE
        }
    }
}
