//! Attacks on identity: forged, replayed, confused and malformed tokens and credentials.

use super::*;

/// Credentials and tokens.
pub(super) fn token_cases(s: &Stack) -> (Vec<Case>, std::net::TcpListener) {
    let m = &s.minter;
    let good = m.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    let other = m.valid("other", "default").unwrap();
    let u = || Some("UNAUTHORIZED");
    let mut v = vec![
        Case::new(
            "duplicated Authorization (same valid Basic twice)",
            with_token(mreq(), &good).basic("sa", &good),
            401,
            u(),
            Up::Nothing,
        )
        .mention("more than one Authorization"),
        Case::new(
            "duplicated Authorization, different case (authorization + Authorization)",
            mreq()
                .header("authorization", &format!("Bearer {good}"))
                .header("Authorization", &format!("Bearer {other}")),
            401,
            u(),
            Up::Nothing,
        )
        .mention("more than one Authorization"),
        Case::new(
            "Basic and Bearer at once (valid Basic, foreign Bearer)",
            with_token(mreq(), &good).bearer(&other),
            401,
            u(),
            Up::Nothing,
        )
        .mention("more than one Authorization"),
        Case::new(
            "Basic and Bearer in one header value",
            mreq().header(
                "Authorization",
                &format!("Basic {}, Bearer {good}", basic_value("sa", &good)),
            ),
            401,
            u(),
            Up::Nothing,
        )
        .mention("more than one Authorization"),
        Case::new(
            "valid token only in Proxy-Authorization",
            mreq().header("Proxy-Authorization", &format!("Bearer {good}")),
            401,
            u(),
            Up::Nothing,
        )
        .mention("no credential"),
        Case::new(
            "alg none",
            with_token(
                mreq(),
                &m.token(CONNECTOR_NAMESPACE, "default").alg_none().mint().unwrap(),
            ),
            401,
            u(),
            Up::Nothing,
        )
        .mention("alg none"),
    ];
    // alg "None" / "nOnE" spelled otherwise, with a forged signature part.
    let none_mixed = {
        let h = json!({ "alg": "nOnE", "typ": "JWT", "kid": "rsa-1" });
        remember(format!(
            "{}.{}.",
            b64url(h.to_string().as_bytes()),
            b64url(claims(CONNECTOR_NAMESPACE, "default").to_string().as_bytes())
        ))
    };
    v.push(
        Case::new(
            "alg nOnE (mixed case)",
            with_token(mreq(), &none_mixed),
            401,
            u(),
            Up::Nothing,
        )
        .mention("alg none"),
    );
    // Key confusion: HS256 keyed with the RSA public key's bytes.
    let pem = key_pem(s, "rsa-1");
    let (spki_pem, pkcs1_pem, spki_der) = public_key_encodings(&pem);
    let n = s.minter.jwks()["keys"][0]["n"].as_str().unwrap_or("").to_string();
    let jwks_json = s.minter.jwks().to_string();
    let c = claims(CONNECTOR_NAMESPACE, "default");
    let hs = json!({ "alg": "HS256", "typ": "JWT", "kid": "rsa-1" });
    for (what, secret) in [
        ("SPKI PEM", spki_pem.clone()),
        ("PKCS#1 PEM", pkcs1_pem),
        ("SPKI DER", spki_der),
        ("JWK n (base64url text)", n.as_bytes().to_vec()),
        ("JWK n (decoded modulus)", b64url_decode(&n)),
        ("whole JWKS JSON", jwks_json.into_bytes()),
    ] {
        v.push(
            Case::new(
                format!("HS256 key confusion, secret = RSA public key {what}"),
                with_token(mreq(), &hs256(&hs, &c, &secret)),
                401,
                u(),
                Up::Nothing,
            )
            .mention("does not match key"),
        );
    }
    // The same without a kid, and with the EC key's kid.
    v.push(
        Case::new(
            "HS256 with the public key PEM, no kid",
            with_token(mreq(), &hs256(&json!({ "alg": "HS256", "typ": "JWT" }), &c, &spki_pem)),
            401,
            u(),
            Up::Nothing,
        )
        .mention("no 'kid'"),
    );
    // Embedded attacker keys: verification must use only the configured JWKS.
    let rogue = key_pem(s, "rogue-1");
    let rogue_jwk = rsa_public_jwk(&rogue, "rsa-1");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let trap = format!("http://127.0.0.1:{}/jwks.json", listener.local_addr().unwrap().port());
    let attacker_headers = [
        (
            "embedded jwk (attacker key) under the published kid",
            json!({ "alg": "RS256", "kid": "rsa-1", "jwk": rogue_jwk }),
            "signature does not verify",
        ),
        (
            "embedded jwk (attacker key), no kid",
            json!({ "alg": "RS256", "jwk": rogue_jwk }),
            "no 'kid'",
        ),
        (
            "jku pointing at an attacker JWKS, attacker kid",
            json!({ "alg": "RS256", "kid": "rogue-1", "jku": trap }),
            "not among the configured JWKS keys",
        ),
        (
            "jku pointing at an attacker JWKS, published kid",
            json!({ "alg": "RS256", "kid": "rsa-1", "jku": trap }),
            "signature does not verify",
        ),
        (
            "x5u pointing at an attacker certificate, published kid",
            json!({ "alg": "RS256", "kid": "rsa-1", "x5u": trap }),
            "signature does not verify",
        ),
        (
            "x5c with an attacker chain, published kid",
            json!({ "alg": "RS256", "kid": "rsa-1", "x5c": ["MIIB"] }),
            "signature does not verify",
        ),
    ];
    for (what, header, mention) in attacker_headers {
        v.push(
            Case::new(
                what,
                with_token(mreq(), &rs256(&header, &c, &rogue)),
                401,
                u(),
                Up::Nothing,
            )
            .mention(mention),
        );
    }
    v.push(Case::new(
        "jku/x5u on a genuinely signed token are ignored (forwarded, not fetched)",
        with_token(
            mreq(),
            &rs256(
                &json!({ "alg": "RS256", "kid": "rsa-1", "jku": trap, "x5u": trap, "jwk": rsa_public_jwk(&rogue, "x") }),
                &c,
                &pem,
            ),
        ),
        200,
        None,
        Up::Connector,
    ).line(upstream_manifest_line()));
    // Oversized and traversal kids.
    v.push(
        Case::new(
            "kid of 10 000 characters",
            with_token(
                mreq(),
                &m.token(CONNECTOR_NAMESPACE, "default")
                    .kid(Some(&"k".repeat(10_000)))
                    .mint()
                    .unwrap(),
            ),
            401,
            u(),
            Up::Nothing,
        )
        .mention("not among the configured JWKS keys"),
    );
    v.push(
        Case::new(
            "kid of 20 000 characters (token over 16 KiB)",
            with_token(
                mreq(),
                &m.token(CONNECTOR_NAMESPACE, "default")
                    .kid(Some(&"k".repeat(20_000)))
                    .mint()
                    .unwrap(),
            ),
            401,
            u(),
            Up::Nothing,
        )
        .mention("longer than"),
    );
    v.push(
        Case::new(
            "kid ../../etc/passwd",
            with_token(
                mreq(),
                &m.token(CONNECTOR_NAMESPACE, "default")
                    .kid(Some("../../etc/passwd"))
                    .mint()
                    .unwrap(),
            ),
            401,
            u(),
            Up::Nothing,
        )
        .mention("not among the configured JWKS keys"),
    );
    v.push(
        Case::new(
            "kid rsa-1/../ec-1",
            with_token(
                mreq(),
                &m.token(CONNECTOR_NAMESPACE, "default")
                    .kid(Some("rsa-1/../ec-1"))
                    .mint()
                    .unwrap(),
            ),
            401,
            u(),
            Up::Nothing,
        )
        .mention("not among the configured JWKS keys"),
    );
    // Wrong claim types (validly signed).
    let t = now();
    let typed = [
        (
            "exp as a string",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim("exp", json!((t + 3600).to_string()))
                .mint()
                .unwrap(),
            "not a number of seconds",
        ),
        (
            "exp as a negative number",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim("exp", json!(-1))
                .mint()
                .unwrap(),
            "not a number of seconds",
        ),
        (
            "nbf as an object",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim("nbf", json!({"t": 1}))
                .mint()
                .unwrap(),
            "not a number of seconds",
        ),
        (
            "aud as a number",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim("aud", json!(12345))
                .mint()
                .unwrap(),
            "audience does not include",
        ),
        (
            "aud as an object holding the audience",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim("aud", json!({"oci-connector": true}))
                .mint()
                .unwrap(),
            "audience does not include",
        ),
        (
            "kubernetes.io as a string",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim("kubernetes.io", json!("demo"))
                .mint()
                .unwrap(),
            "lacks the Kubernetes claims",
        ),
        (
            "kubernetes.io.namespace as a number",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim(
                    "kubernetes.io",
                    json!({"namespace": 7, "serviceaccount": {"name": "default"}}),
                )
                .mint()
                .unwrap(),
            "lacks the Kubernetes claims",
        ),
        (
            "sub of another namespace than kubernetes.io",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim("sub", json!("system:serviceaccount:other:default"))
                .mint()
                .unwrap(),
            "'sub' does not match",
        ),
        (
            "iss as an array holding the issuer",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim("iss", json!([connector_devkit::tokens::ISSUER]))
                .mint()
                .unwrap(),
            "not an allowed issuer",
        ),
    ];
    for (what, tok, mention) in typed {
        v.push(
            Case::new(
                format!("claim type: {what}"),
                with_token(mreq(), &tok),
                401,
                u(),
                Up::Nothing,
            )
            .mention(mention),
        );
    }
    // A token valid for one year: refused (identity.maxTokenLifetimeSeconds, 24 h by default),
    // so a stolen long-lived token does not stay useful. (Was a finding of this suite.)
    v.push(
        Case::new(
            "token with a 1-year lifetime",
            with_token(
                mreq(),
                &m.token(CONNECTOR_NAMESPACE, "default")
                    .claim("exp", json!(t + 365 * 24 * 3600))
                    .mint()
                    .unwrap(),
            ),
            401,
            u(),
            Up::Nothing,
        )
        .mention("longer than the 86400 s"),
    );
    v.push(
        Case::new(
            "token without exp",
            with_token(
                mreq(),
                &m.token(CONNECTOR_NAMESPACE, "default").without("exp").mint().unwrap(),
            ),
            401,
            u(),
            Up::Nothing,
        )
        .mention("no 'exp'"),
    );
    (v, listener)
}
