//! `connector-credential-provider`: the kubelet's exec plugin.

fn main() {
    eprintln!("connector-credential-provider: not implemented yet");
    std::process::exit(2);
}
