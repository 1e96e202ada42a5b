//! `connector-credential-provider`: the kubelet's exec plugin. I/O only: flags and environment
//! into [`Settings`], stdin into [`respond`], the response to stdout, refusals to stderr with an
//! exit code. The decision lives in the library.

use connector_credential_provider::{Settings, respond};
use std::io::{Read, Write};
use std::process::ExitCode;

const USAGE: &str = "\
connector-credential-provider: kubelet CredentialProvider (credentialprovider.kubelet.k8s.io/v1) exec plugin.
Answers images on the connector proxy with the pod's ServiceAccount token as the password.

Flags (each falls back to its environment variable):
  --proxy <host[:port]>           the proxy as image references name it (path form
                                  PROXY/namespaces/<ns>/connectors/<name>/<repo>)      [OCI_CONNECTOR_PROXY]
  --host-connectors <ns>/<name>[,...]
                                  host form: only the host names of these connectors get a
                                  token (any namespace can create a c-*-connector Service, so
                                  no name is trusted by its shape)      [OCI_CONNECTOR_HOST_CONNECTORS]
  --host-pattern <pattern>        how a connector's host is named, as the filter's
                                  proxy.hostPattern and the webhook's --host-pattern
                                  (default c-{name}-connector.{namespace}.svc.cluster.local)
                                                                      [OCI_CONNECTOR_HOST_PATTERN]
  --host-port <port>              the port host-form images name (default: none)
                                                                      [OCI_CONNECTOR_HOST_PORT]
  --help

Reads a CredentialProviderRequest on stdin, writes a CredentialProviderResponse on stdout.
Exit codes: 0 response written (empty auth for other registries), 1 usage, 2 malformed request,
3 no ServiceAccount token for a proxy image.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let settings = match Settings::from_args(&args, |k| std::env::var(k).ok()) {
        Ok(Some(s)) => s,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("connector-credential-provider: {e}\n\n{USAGE}");
            return ExitCode::from(1);
        }
    };
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("connector-credential-provider: cannot read the request on stdin: {e}");
        return ExitCode::from(2);
    }
    match respond(&input, &settings) {
        Ok(response) => {
            let out = match serde_json::to_vec(&response) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("connector-credential-provider: cannot encode the response: {e}");
                    return ExitCode::from(2);
                }
            };
            let mut stdout = std::io::stdout().lock();
            if let Err(e) = stdout.write_all(&out).and_then(|_| stdout.flush()) {
                eprintln!("connector-credential-provider: cannot write the response: {e}");
                return ExitCode::from(2);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("connector-credential-provider: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
