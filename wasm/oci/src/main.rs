//! `wasm-oci package --module <file.wasm> --out <layout dir> [--tag 0.1.0]`: writes the filter
//! as a Wasm OCI artifact layout and prints the digests (push it with
//! `skopeo copy oci:<dir>:<tag> docker://<registry>/<repo>:<tag>`).

use std::path::PathBuf;
use std::process::ExitCode;

/// Writes the filter module as a Wasm OCI artifact layout.
#[derive(clap::Parser)]
#[command(name = "wasm-oci", disable_version_flag = true)]
enum Cli {
    /// Package a module: prints the layout, the manifest digest and the module's digest.
    Package {
        /// The module (`target/wasm32-wasip1/release/connector_filter.wasm`).
        #[arg(long)]
        module: PathBuf,
        /// The OCI image layout directory to write.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "0.1.0")]
        tag: String,
    },
}

fn main() -> ExitCode {
    use clap::Parser as _;
    let Cli::Package { module, out, tag } = Cli::parse();
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
