//! The whole story in one run: a private registry with a robot account, a ServiceAccount-style
//! token, Envoy with the connector filter, pulls in both address forms with skopeo, one refused
//! pull, and proof that the upstream saw the robot's credential and never the token.
//! `cargo run -p connector-devkit --bin demo` (after `make demo`'s setup and wasm build).

use connector_devkit::http::{Request, basic_value};
use connector_devkit::image;
use connector_devkit::skopeo::Creds;
use connector_devkit::stack::{
    CONNECTOR_NAME, CONNECTOR_NAMESPACE, REPO, Stack, TAG, UPSTREAM_USER, check_host_form_resolves,
};
use connector_devkit::{Result, wasm_path};
use std::process::ExitCode;

fn main() -> ExitCode {
    println!("OCI connector demo: secretless pulls from a private registry through Envoy\n");
    let stack = match Stack::start("demo", true) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("FAIL  could not start the demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let module_kb = std::fs::metadata(wasm_path()).map(|m| m.len() / 1024).unwrap_or(0);
    println!(
        "      upstream registry  {} (CNCF Distribution, htpasswd, user {UPSTREAM_USER}, password generated, not shown)",
        stack.registry.url()
    );
    println!(
        "      sample image       {REPO}:{TAG}, {} layers, pushed straight to the registry",
        stack.image.layers.len()
    );
    println!(
        "      proxy              Envoy on {} with the connector filter ({module_kb} KB wasm)",
        stack.envoy.authority()
    );
    println!(
        "      connector          {CONNECTOR_NAMESPACE}/{CONNECTOR_NAME}; the password reaches the filter only through Envoy's environment\n"
    );

    let mut failures = 0;
    let mut step = |name: &str, r: Result<String>| match r {
        Ok(detail) => println!("ok    {name}: {detail}"),
        Err(e) => {
            failures += 1;
            println!("FAIL  {name}: {e}");
        }
    };
    let token = stack.minter.valid(CONNECTOR_NAMESPACE, "default");
    let token = match token {
        Ok(t) => t,
        Err(e) => {
            println!("FAIL  mint a token: {e}");
            return ExitCode::FAILURE;
        }
    };
    step(
        "token",
        Ok(format!(
            "system:serviceaccount:{CONNECTOR_NAMESPACE}:default, audience oci-connector, 1 h (the client's only secret)"
        )),
    );

    let path_ref = stack.path_ref(CONNECTOR_NAMESPACE, CONNECTOR_NAME, REPO, TAG);
    step("pull, path form", pull(&stack, &path_ref, &token, "pulled-path"));
    let host_ref = stack.host_ref(CONNECTOR_NAMESPACE, CONNECTOR_NAME, REPO, TAG);
    step(
        "pull, host form",
        check_host_form_resolves(CONNECTOR_NAMESPACE, CONNECTOR_NAME)
            .and_then(|_| pull(&stack, &host_ref, &token, "pulled-host")),
    );
    step("what the upstream received", upstream_check(&stack, &token));
    step("refused pull", refused(&stack));
    step(
        "Envoy log and config dump",
        stack.envoy_hygiene_problems().and_then(|p| {
            if p.is_empty() {
                Ok("no password, no token, no [critical] wasm line".into())
            } else {
                Err(p.join("; "))
            }
        }),
    );
    drop(stack);
    println!();
    if failures == 0 {
        println!("demo: every step behaved as expected; all processes stopped");
        ExitCode::SUCCESS
    } else {
        println!("demo: {failures} step(s) did not behave as expected");
        ExitCode::FAILURE
    }
}

/// skopeo inspect + copy through the proxy; layers must equal what was pushed.
fn pull(stack: &Stack, reference: &str, token: &str, label: &str) -> Result<String> {
    let out = stack
        .skopeo
        .inspect(reference, Creds::Basic("sa", token), false)?
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).map_err(|e| format!("inspect output: {e}"))?;
    let inspected: Vec<String> = serde_json::from_value(v["Layers"].clone()).unwrap_or_default();
    if inspected != stack.image.layers {
        return Err(format!(
            "inspect shows layers {inspected:?}, pushed {:?}",
            stack.image.layers
        ));
    }
    let dest = stack.work.sub(label)?;
    let dest_ref = format!("oci:{}:{TAG}", dest.display());
    stack
        .skopeo
        .copy(reference, Creds::Basic("sa", token), &dest_ref, Creds::None)?
        .ok()?;
    let copied = image::oci_layers(&dest, TAG)?;
    if copied != stack.image.layers {
        return Err(format!("copied layers {copied:?}, pushed {:?}", stack.image.layers));
    }
    Ok(format!(
        "{} -> {} layers identical to the pushed image",
        reference.trim_start_matches("docker://"),
        copied.len()
    ))
}

fn upstream_check(stack: &Stack, token: &str) -> Result<String> {
    let seen = stack.recorder.take();
    let robot = format!("Basic {}", basic_value(UPSTREAM_USER, stack.password()));
    let auths = seen.authorizations();
    if auths.is_empty() || auths.iter().any(|a| *a != robot) {
        return Err(format!(
            "expected only the robot's credential on {} requests",
            seen.requests
        ));
    }
    if seen.text.contains(token) || seen.text.contains(&basic_value("sa", token)) {
        return Err("the client's token reached the upstream".into());
    }
    Ok(format!(
        "{} requests, all with the robot's Basic credential, none with the client's token",
        seen.requests
    ))
}

/// A token of namespace `other` against demo/registry: skopeo must fail and the upstream see
/// nothing; the OCI error message is shown.
fn refused(stack: &Stack) -> Result<String> {
    let outsider = stack.minter.valid("other", "default")?;
    let reference = stack.path_ref(CONNECTOR_NAMESPACE, CONNECTOR_NAME, REPO, TAG);
    stack.recorder.take();
    let out = stack.skopeo.inspect(&reference, Creds::Basic("sa", &outsider), false)?;
    if out.success {
        return Err("a token of namespace other could read demo/registry".into());
    }
    let path = format!("/v2/namespaces/{CONNECTOR_NAMESPACE}/connectors/{CONNECTOR_NAME}/{REPO}/manifests/{TAG}");
    let resp = Request::get(&path).basic("sa", &outsider).send(stack.envoy.port)?;
    let body = resp.json()?;
    let message = body["errors"][0]["message"]
        .as_str()
        .unwrap_or("<no OCI error message>");
    let code = body["errors"][0]["code"].as_str().unwrap_or("?");
    let seen = stack.recorder.take();
    if !seen.is_empty() {
        return Err(format!("the upstream received {:?}", seen.request_lines()));
    }
    if !(400..500).contains(&resp.status) {
        return Err(format!("expected a 4xx refusal, got {}", resp.summary()));
    }
    Ok(format!(
        "system:serviceaccount:other:default -> {} {code}: {message} (skopeo failed too; upstream received nothing)",
        resp.status
    ))
}
