//! Who is calling: the client's credential (Basic with the token as password, or Bearer),
//! local verification of the Kubernetes ServiceAccount JWT against configured JWKS keys,
//! and the cache of verified tokens that keeps signature work off the steady-state path.
//!
//! Checks run in a fixed order and each failure names the check, so a person can tell an
//! expired token from a wrong audience. Nothing here ever echoes a token or a password.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::rc::Rc;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Map, Value};
use siphasher::sip128::{Hasher128, SipHasher13};

use crate::respond::{Refusal, quote};
use crate::route::is_dns_label;

/// Real ServiceAccount tokens are about 1 KB; anything far larger is refused unparsed.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
pub use connector_core::config::{Algorithm, MAX_CLOCK_SKEW};

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
    /// `exp` of the token (seconds since the epoch).
    pub expires_at: u64,
    /// The objects the token is bound to, as its `kubernetes.io` claims name them: RBAC mode
    /// has the controller check they still exist, so a deleted ServiceAccount's or Pod's
    /// token is refused before its `exp`.
    pub bound: Bound,
    /// `system:serviceaccount:<namespace>:<service account>`, built once per verified token: the
    /// access log and the controller's checks name the caller by it on every request.
    subject: String,
}

/// `kubernetes.io.serviceaccount.uid`, and `kubernetes.io.pod` (`name`, `uid`) for a token
/// bound to a Pod; empty when the token does not carry them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bound {
    pub service_account_uid: String,
    pub pod: Option<(String, String)>,
}

impl Identity {
    pub fn new(namespace: &str, service_account: &str, expires_at: u64, bound: Bound) -> Self {
        Self {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            expires_at,
            bound,
            subject: ["system:serviceaccount:", namespace, ":", service_account].concat(),
        }
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }
}

pub use connector_core::keys::{PublicKey, VerifyKey};

/// What a token must satisfy; compiled from the configuration.
#[derive(Clone)]
pub struct TokenPolicy {
    pub keys: HashMap<String, VerifyKey>,
    pub issuers: HashSet<String>,
    pub audiences: HashSet<String>,
    pub clock_skew: u64,
    /// Longest remaining lifetime a token may have, in seconds: a stolen long-lived token is
    /// refused rather than honoured for a year.
    pub max_lifetime: u64,
}

const HOW_TO_LOG_IN: &str = "log in with any username and a ServiceAccount token as the password \
    (kubectl create token <serviceaccount> -n <namespace>), or send it as 'Authorization: Bearer <token>'";

/// Extracts the token from all `Authorization` values of the request: a bearer token is
/// borrowed (no copy of a ~1 KB token per request), a Basic password is decoded.
pub fn extract_token<'a>(values: &[&'a str]) -> Result<Cow<'a, str>, Refusal> {
    let value = match values {
        [] => {
            return Err(Refusal::unauthorized(
                "no_credential",
                format!("no credential: {HOW_TO_LOG_IN}"),
            ));
        }
        [one] => one.trim(),
        _ => {
            return Err(Refusal::unauthorized(
                "duplicate_authorization",
                "the request carries more than one Authorization header: send exactly one",
            ));
        }
    };
    // Envoy folds repeated headers into one comma-separated value; no Basic or Bearer
    // credential contains a comma, so a comma means more than one credential was sent.
    if value.contains(',') {
        return Err(Refusal::unauthorized(
            "duplicate_authorization",
            "the request carries more than one Authorization header: send exactly one",
        ));
    }
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    let token = if scheme.eq_ignore_ascii_case("basic") {
        let decoded = STANDARD.decode(rest).map_err(|_| {
            Refusal::unauthorized(
                "malformed_credential",
                "malformed Basic credential: expected base64(<username>:<token>)",
            )
        })?;
        let text = String::from_utf8(decoded)
            .map_err(|_| Refusal::unauthorized("malformed_credential", "malformed Basic credential: not UTF-8"))?;
        let Some((_, password)) = text.split_once(':') else {
            return Err(Refusal::unauthorized(
                "malformed_credential",
                "malformed Basic credential: expected <username>:<token>",
            ));
        };
        Cow::Owned(password.to_string())
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Cow::Borrowed(rest)
    } else {
        return Err(Refusal::unauthorized(
            "malformed_credential",
            // Nothing of the value is repeated: without a space, the "scheme" is the credential.
            format!("unsupported Authorization scheme: expected Basic or Bearer; {HOW_TO_LOG_IN}"),
        ));
    };
    if token.is_empty() {
        return Err(Refusal::unauthorized(
            "empty_credential",
            format!("empty credential: {HOW_TO_LOG_IN}"),
        ));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(Refusal::unauthorized(
            "malformed_token",
            format!("token is longer than {MAX_TOKEN_LEN} bytes: expected a ServiceAccount token"),
        ));
    }
    Ok(token)
}

fn bad(reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal::unauthorized(reason, message)
}

fn decode_json_part(part: &str, what: &str) -> Result<Map<String, Value>, Refusal> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| {
        bad(
            "malformed_token",
            format!("token {what} is not base64url: expected a JWT (header.claims.signature)"),
        )
    })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(bad(
            "malformed_token",
            format!("token {what} is not a JSON object: expected a JWT"),
        )),
    }
}

/// A host's own check of a signature: `(hash, DER SubjectPublicKeyInfo, signature, signed
/// bytes)`; `Some(true)` when the host confirms it. In Envoy it is the `verify_signature`
/// foreign function (BoringSSL), set by the shim at VM start ([`set_host_check`]).
pub type HostCheck = fn(&str, &[u8], &[u8], &[u8]) -> Option<bool>;

thread_local! {
    static HOST_CHECK: std::cell::Cell<Option<HostCheck>> = const { std::cell::Cell::new(None) };
}

/// Lets (`Some`) or stops (`None`) the host check keys that offer one (RS256/384/512, ES256,
/// ES384).
pub fn set_host_check(check: Option<HostCheck>) {
    HOST_CHECK.set(check);
}

/// Whether `signature` signs `message` under `key`. Where the key offers the host its check
/// (PKCS#1 v1.5, ES256 and ES384: the same checks BoringSSL makes) and the host confirms, that
/// is the answer: in Envoy BoringSSL is several times faster than this module's own arithmetic
/// under V8 (README, "Benchmark"). Only a confirmation is taken from the host: a refusal, an
/// error or a host without the function leaves the check to the module, so a host quirk costs
/// time but never refuses a good token.
fn signature_holds(key: &VerifyKey, message: &[u8], signature: &[u8]) -> bool {
    if let (Some(check), Some(args)) = (HOST_CHECK.get(), key.host_check(signature))
        && check(args.hash, args.key, &args.signature, message) == Some(true)
    {
        return true;
    }
    key.verifies(message, signature)
}

/// Verifies a ServiceAccount JWT. `now` is seconds since the epoch.
pub fn verify(token: &str, policy: &TokenPolicy, now: u64) -> Result<Identity, Refusal> {
    verify_with_kid(token, policy, now).map(|(identity, _)| identity)
}

/// [`verify`], also returning the `kid` of the key that verified the token: the cache keeps a
/// token only while that key stays configured.
pub fn verify_with_kid(token: &str, policy: &TokenPolicy, now: u64) -> Result<(Identity, String), Refusal> {
    let mut parts = token.split('.');
    let (Some(header_b64), Some(claims_b64), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(
            "malformed_token",
            "credential is not a JWT: expected header.claims.signature",
        ));
    };
    let header = decode_json_part(header_b64, "header")?;

    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    if alg.is_empty() || alg.eq_ignore_ascii_case("none") {
        return Err(bad(
            "alg_none",
            "unsigned token (alg none or missing): expected a signed ServiceAccount token",
        ));
    }
    if header.contains_key("crit") {
        return Err(bad(
            "unsupported_header",
            "token header has 'crit' parameters, which this proxy does not understand",
        ));
    }
    let Some(kid) = header.get("kid").and_then(Value::as_str) else {
        return Err(bad(
            "unknown_kid",
            "token header has no 'kid': expected a key id from the cluster's JWKS",
        ));
    };
    // No keys at all: a proxy whose controller has not written its configuration yet (the
    // Istio WasmPlugin as shipped). Say so rather than blame the token.
    if policy.keys.is_empty() {
        return Err(bad(
            "unknown_kid",
            "this proxy has no ServiceAccount keys yet: its controller has not written the filter configuration (check the controller's log); every token is refused until then",
        ));
    }
    // Keys are looked up by id only: an embedded 'jwk', 'jku' or 'x5u' is never used.
    let Some(key) = policy.keys.get(kid) else {
        return Err(bad(
            "unknown_kid",
            format!(
                "token key id {} is not among the configured JWKS keys: the token comes from another cluster or its key was rotated out",
                quote(kid)
            ),
        ));
    };
    if alg != algorithm_name(key.algorithm) {
        return Err(bad(
            "alg_mismatch",
            format!(
                "token alg {} does not match key {}, which is {}",
                quote(alg),
                quote(kid),
                algorithm_name(key.algorithm)
            ),
        ));
    }
    let signed_len = header_b64.len() + 1 + claims_b64.len();
    let message = token.as_bytes().get(..signed_len).unwrap_or_default();
    let Ok(signature) = URL_SAFE_NO_PAD.decode(signature) else {
        return Err(bad("bad_signature", "token signature is malformed"));
    };
    if !signature_holds(key, message, &signature) {
        return Err(bad(
            "bad_signature",
            "token signature does not verify against the configured key",
        ));
    }

    // Claims are read only after the signature holds.
    let claims = decode_json_part(claims_b64, "claims")?;
    Ok((check_claims(&claims, policy, now)?, kid.to_string()))
}

fn number_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, Refusal> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => match v
            .as_u64()
            .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        {
            Some(n) => Ok(Some(n)),
            None => Err(bad(
                "bad_claims",
                format!("token claim '{name}' is not a number of seconds"),
            )),
        },
    }
}

fn check_claims(claims: &Map<String, Value>, policy: &TokenPolicy, now: u64) -> Result<Identity, Refusal> {
    let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
    if !policy.issuers.contains(iss) {
        return Err(bad(
            "wrong_issuer",
            format!("token issuer {} is not an allowed issuer", quote(iss)),
        ));
    }
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !audiences.iter().any(|a| policy.audiences.contains(*a)) {
        let mut want: Vec<&str> = policy.audiences.iter().map(String::as_str).collect();
        want.sort_unstable();
        return Err(bad(
            "wrong_audience",
            format!(
                "token audience does not include {}: create the token with --audience {}",
                want.join(" or "),
                want.first().unwrap_or(&"")
            ),
        ));
    }
    let Some(exp) = number_claim(claims, "exp")? else {
        return Err(bad(
            "bad_claims",
            "token has no 'exp' claim: expected a token that expires",
        ));
    };
    if now > exp.saturating_add(policy.clock_skew) {
        return Err(bad(
            "expired",
            format!(
                "token expired {} s ago (allowed clock skew {} s): create a new one",
                now - exp,
                policy.clock_skew
            ),
        ));
    }
    if exp
        > now
            .saturating_add(policy.max_lifetime)
            .saturating_add(policy.clock_skew)
    {
        return Err(bad(
            "lifetime_too_long",
            format!(
                "token is valid for {} s more, longer than the {} s this proxy accepts: create one with a shorter \
                 --duration (kubectl create token ... --duration=1h)",
                exp - now,
                policy.max_lifetime
            ),
        ));
    }
    if let Some(nbf) = number_claim(claims, "nbf")?
        && now.saturating_add(policy.clock_skew) < nbf
    {
        return Err(bad(
            "not_yet_valid",
            format!(
                "token is not valid for another {} s (nbf in the future, allowed clock skew {} s)",
                nbf - now,
                policy.clock_skew
            ),
        ));
    }
    number_claim(claims, "iat")?;

    let k8s = claims.get("kubernetes.io").and_then(Value::as_object);
    let namespace = k8s
        .and_then(|k| k.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let service_account = k8s
        .and_then(|k| k.get("serviceaccount"))
        .and_then(|s| s.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if !is_dns_label(namespace) || service_account.is_empty() || !crate::route::is_dns_subdomain(service_account) {
        return Err(bad(
            "bad_claims",
            "token lacks the Kubernetes claims kubernetes.io.namespace and kubernetes.io.serviceaccount.name: expected a ServiceAccount token",
        ));
    }
    let text = |v: Option<&Value>, key: &str| v.and_then(|o| o.get(key)).and_then(Value::as_str).map(str::to_string);
    let pod = k8s.and_then(|k| k.get("pod"));
    let identity = Identity::new(
        namespace,
        service_account,
        exp,
        Bound {
            service_account_uid: text(k8s.and_then(|k| k.get("serviceaccount")), "uid").unwrap_or_default(),
            pod: text(pod, "name").zip(text(pod, "uid")),
        },
    );
    let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("");
    if sub != identity.subject() {
        return Err(bad(
            "bad_claims",
            "token 'sub' does not match its kubernetes.io namespace and service account",
        ));
    }
    Ok(identity)
}

pub fn algorithm_name(a: Algorithm) -> &'static str {
    a.name()
}

/// A token's name in the caches: SipHash-1-3's 128-bit output under a key drawn once per cache
/// (per VM) and never shown anywhere. Keeping the 16-byte name instead of the token (about 1 KB)
/// is most of the filter's memory at the default 10,000 entries: 13 MiB against 3 MiB per VM
/// (`mem-cost`). Hashing the token is no new cost: the map hashed the whole token before, now it
/// hashes 16 bytes. Without the key nobody can aim a token at another's name, and a chance
/// collision among 10,000 entries is about 2^-101.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct TokenKey(u128);

#[derive(Clone)]
struct Keyer(SipHasher13);

impl Keyer {
    fn new() -> Self {
        // std's RandomState draws its SipHash keys from WASI `random_get` (Envoy provides it);
        // two of its hashes are 128 secret bits without a second source of entropy to fail.
        let (a, b) = (RandomState::new(), RandomState::new());
        Keyer(SipHasher13::new_with_keys(
            a.hash_one(0x6b31_u32),
            b.hash_one(0x6b32_u32),
        ))
    }

    fn key(&self, token: &str) -> TokenKey {
        let mut h = self.0;
        h.write(token.as_bytes());
        TokenKey(h.finish128().as_u128())
    }
}

/// Verified tokens, by their [`TokenKey`]. Bounded (oldest evicted first); an entry expires with
/// its token. (Keying by a SHA-256 of the token was measured at several µs per request in the
/// VM; SipHash-1-3 is what the map used to hash the whole token with anyway.)
pub struct TokenCache {
    capacity: usize,
    keyer: Keyer,
    /// Each token's identity and the `kid` of the key that verified it.
    entries: HashMap<TokenKey, (Rc<Identity>, Rc<str>)>,
    order: VecDeque<TokenKey>,
    /// Tokens that failed verification, with their refusal, until `REFUSED_TTL` after: the same
    /// bad token sent again costs a lookup, not a signature check.
    refused: HashMap<TokenKey, (Refusal, u64)>,
    refused_order: VecDeque<TokenKey>,
    /// Failed verifications in the current second: (second, count).
    failures: (u64, u32),
}

/// How long a failed token's refusal is remembered.
const REFUSED_TTL: u64 = 60;
/// How many refused tokens are remembered per VM.
const REFUSED_CAPACITY: usize = 4096;
/// Failed signature checks allowed per VM per second. Past it, tokens not already verified are
/// answered 429 until the next second: an attacker sending garbage signatures costs at most this
/// many verifications a second (about 1 ms each), while tokens already verified are unaffected.
pub const MAX_FAILED_VERIFICATIONS_PER_SECOND: u32 = 32;

impl TokenCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            keyer: Keyer::new(),
            entries: HashMap::new(),
            order: VecDeque::new(),
            refused: HashMap::new(),
            refused_order: VecDeque::new(),
            failures: (0, 0),
        }
    }

    /// The remembered refusal of a token that failed verification, while it lasts.
    fn refused(&mut self, key: TokenKey, now: u64) -> Option<Refusal> {
        let (r, until) = self.refused.get(&key)?;
        if now >= *until {
            self.refused.remove(&key);
            return None;
        }
        Some(r.clone())
    }

    /// Whether one more signature check may run this second.
    fn may_verify(&self, now: u64) -> bool {
        self.failures.0 != now || self.failures.1 < MAX_FAILED_VERIFICATIONS_PER_SECOND
    }

    fn remember_refusal(&mut self, key: TokenKey, r: &Refusal, now: u64) {
        if self.failures.0 == now {
            self.failures.1 = self.failures.1.saturating_add(1);
        } else {
            self.failures = (now, 1);
        }
        while self.refused.len() >= REFUSED_CAPACITY {
            match self.refused_order.pop_front() {
                Some(oldest) => {
                    self.refused.remove(&oldest);
                }
                None => break,
            }
        }
        self.refused.insert(key, (r.clone(), now.saturating_add(REFUSED_TTL)));
        self.refused_order.push_back(key);
        if self.refused_order.len() > REFUSED_CAPACITY.saturating_mul(2) {
            let refused = &self.refused;
            self.refused_order.retain(|k| refused.contains_key(k));
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A cached identity, if the token was verified before and has not expired since.
    pub fn get(&mut self, token: &str, now: u64, skew: u64) -> Option<Rc<Identity>> {
        self.get_by_key(self.keyer.key(token), now, skew)
    }

    fn get_by_key(&mut self, key: TokenKey, now: u64, skew: u64) -> Option<Rc<Identity>> {
        let (hit, _) = self.entries.get(&key)?;
        if now > hit.expires_at.saturating_add(skew) {
            self.entries.remove(&key);
            return None;
        }
        Some(Rc::clone(hit))
    }

    /// The cache for a new configuration, from this one's: a verified token stays verified as
    /// long as what it was checked against did not change. Issuers, audiences, skew or maximum
    /// lifetime changed: every token is checked again. Otherwise a token stays only if the `kid`
    /// that verified it names the same key (algorithm and material) in `new`: removing or
    /// replacing a key evicts exactly its tokens. Remembered refusals are dropped (a new key may
    /// make a refused token good); the failure budget of this second is kept.
    pub fn carry_over(mut self, old: &TokenPolicy, new: &TokenPolicy, capacity: usize) -> TokenCache {
        self.capacity = capacity.max(1);
        self.refused.clear();
        self.refused_order.clear();
        let same_claims = old.issuers == new.issuers
            && old.audiences == new.audiences
            && old.clock_skew == new.clock_skew
            && old.max_lifetime == new.max_lifetime;
        if !same_claims {
            self.entries.clear();
            self.order.clear();
            return self;
        }
        let unchanged = |kid: &str| match (old.keys.get(kid), new.keys.get(kid)) {
            (Some(a), Some(b)) => a.algorithm == b.algorithm && a.material == b.material,
            _ => false,
        };
        self.entries.retain(|_, (_, kid)| unchanged(kid));
        let entries = &self.entries;
        self.order.retain(|k| entries.contains_key(k));
        // A smaller capacity: the oldest go first, as on insertion.
        while self.entries.len() > self.capacity {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.entries.remove(&oldest);
                }
                None => break,
            }
        }
        self
    }

    /// Adds a verified token, evicting the oldest entries when full. O(1) amortised: under a
    /// stream of new tokens (every request a miss) the cache must not add linear work.
    pub fn insert(&mut self, token: &str, identity: Rc<Identity>, kid: &str) {
        self.insert_by_key(self.keyer.key(token), identity, kid);
    }

    fn insert_by_key(&mut self, key: TokenKey, identity: Rc<Identity>, kid: &str) {
        if self.entries.contains_key(&key) {
            return;
        }
        while self.entries.len() >= self.capacity {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.entries.remove(&oldest);
                }
                None => break,
            }
        }
        self.entries.insert(key, (identity, Rc::from(kid)));
        self.order.push_back(key);
        // Entries dropped on expiry leave their key in `order`; compact now and then.
        if self.order.len() > self.capacity.saturating_mul(2) {
            let entries = &self.entries;
            self.order.retain(|k| entries.contains_key(k));
        }
    }
}

/// Verification with the cache in front: steady traffic does no signature work.
pub fn authenticate(
    values: &[&str],
    policy: &TokenPolicy,
    cache: &mut TokenCache,
    now: u64,
) -> Result<(Rc<Identity>, bool), Refusal> {
    let token = extract_token(values)?;
    let key = cache.keyer.key(&token);
    if let Some(identity) = cache.get_by_key(key, now, policy.clock_skew) {
        return Ok((identity, true));
    }
    if let Some(r) = cache.refused(key, now) {
        return Err(r);
    }
    if !cache.may_verify(now) {
        return Err(Refusal::throttled());
    }
    match verify_with_kid(&token, policy, now) {
        Ok((identity, kid)) => {
            let identity = Rc::new(identity);
            cache.insert_by_key(key, Rc::clone(&identity), &kid);
            Ok((identity, false))
        }
        Err(r) => {
            // Only refusals that cost a signature check are counted and remembered: checks that
            // fail before it (malformed, unknown key, wrong algorithm) cost nothing worth
            // bounding, and counting them would let free garbage use up the budget.
            if !CHECKED_BEFORE_SIGNATURE.contains(&r.reason) {
                cache.remember_refusal(key, &r, now);
            }
            Err(r)
        }
    }
}

/// Refusal reasons [`verify`] returns before it checks the signature.
const CHECKED_BEFORE_SIGNATURE: &[&str] = &[
    "malformed_token",
    "alg_none",
    "unsupported_header",
    "unknown_kid",
    "alg_mismatch",
];

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testkeys::*;
    use jsonwebtoken::Algorithm;

    fn claims(ns: &str, sa: &str, now: u64) -> Value {
        serde_json::json!({
            "iss": ISSUER, "aud": [AUDIENCE], "exp": now + 3600, "nbf": now - 5, "iat": now - 5,
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u-1"}}
        })
    }

    fn basic(token: &str) -> String {
        format!("Basic {}", STANDARD.encode(format!("anyone:{token}")))
    }

    #[test]
    fn valid_tokens_rs256_and_es256() {
        let policy = policy();
        let now = NOW;
        for (kid, alg) in [(RSA_KID, Algorithm::RS256), (EC_KID, Algorithm::ES256)] {
            let t = sign(kid, alg, &claims("demo", "default", now));
            let id = verify(&t, &policy, now).unwrap();
            assert_eq!(id.namespace, "demo");
            assert_eq!(id.service_account, "default");
            assert_eq!(id.bound.service_account_uid, "u-1");
            assert_eq!(id.bound.pod, None);
            assert_eq!(extract_token(&[&basic(&t)]).unwrap(), t);
            assert_eq!(extract_token(&[&format!("Bearer {t}")]).unwrap(), t);
        }
        // A token bound to a Pod names it: the controller checks it still exists.
        let mut c = claims("demo", "default", now);
        c["kubernetes.io"]["pod"] = serde_json::json!({"name": "build-1", "uid": "p-9"});
        let id = verify(&sign(RSA_KID, Algorithm::RS256, &c), &policy, now).unwrap();
        assert_eq!(id.bound.pod, Some(("build-1".to_string(), "p-9".to_string())));
    }

    #[test]
    fn a_refused_token_is_remembered_and_garbage_is_throttled_but_verified_tokens_are_not() {
        let policy = policy();
        let mut cache = TokenCache::new(8);
        let good = sign(RSA_KID, Algorithm::RS256, &claims("demo", "default", NOW));
        let good_bearer = format!("Bearer {good}");
        assert!(authenticate(&[&good_bearer], &policy, &mut cache, NOW).is_ok());
        // A valid header and payload with a garbage signature: one verification, then remembered.
        let (head, _) = good.rsplit_once('.').unwrap();
        let bad = |i: u32| format!("Bearer {head}.{}", STANDARD.encode(format!("garbage-signature-{i:08}")));
        let first = authenticate(&[&bad(0)], &policy, &mut cache, NOW).unwrap_err();
        assert_eq!(cache.failures, (NOW, 1));
        let again = authenticate(&[&bad(0)], &policy, &mut cache, NOW).unwrap_err();
        assert_eq!(again, first, "the same refusal, from the negative cache");
        assert_eq!(cache.failures, (NOW, 1), "no second verification");
        // Distinct garbage: at most the budget is verified this second, then 429.
        let mut throttled = 0;
        for i in 1..200 {
            let r = authenticate(&[&bad(i)], &policy, &mut cache, NOW).unwrap_err();
            if r.reason == "verification_throttled" {
                assert_eq!(r.status, 429);
                throttled += 1;
            }
        }
        assert_eq!(cache.failures.1, MAX_FAILED_VERIFICATIONS_PER_SECOND);
        assert_eq!(throttled, 200 - MAX_FAILED_VERIFICATIONS_PER_SECOND as usize);
        // The verified token still passes, from the cache.
        assert!(authenticate(&[&good_bearer], &policy, &mut cache, NOW).unwrap().1);
        // Next second: verification resumes; the remembered refusal lasts its TTL only.
        let r = authenticate(&[&bad(500)], &policy, &mut cache, NOW + 1).unwrap_err();
        assert_ne!(r.reason, "verification_throttled");
        let key = cache.keyer.key(&bad(0)["Bearer ".len()..]);
        assert!(cache.refused(key, NOW + REFUSED_TTL).is_none());
    }

    fn reason(values: &[&str], now: u64) -> &'static str {
        let mut cache = TokenCache::new(8);
        authenticate(values, &policy(), &mut cache, now).unwrap_err().reason
    }

    fn with(f: impl FnOnce(&mut Value)) -> Value {
        let mut c = claims("demo", "default", NOW);
        f(&mut c);
        c
    }

    #[test]
    fn every_refusal_names_its_check() {
        let good = sign(RSA_KID, Algorithm::RS256, &claims("demo", "default", NOW));
        // A bearer credential signed by the RSA key over claims changed by `change`.
        let claims_with =
            |change: fn(&mut Value)| vec![format!("Bearer {}", sign(RSA_KID, Algorithm::RS256, &with(change)))];
        let cases: Vec<(Vec<String>, &str)> = vec![
            (vec![], "no_credential"),
            (vec![basic(&good), basic(&good)], "duplicate_authorization"),
            (
                vec![format!("{},Bearer {good}", basic(&good))],
                "duplicate_authorization",
            ),
            (vec![format!("Bearer {good}, Bearer {good}")], "duplicate_authorization"),
            (vec!["Basic Og==".into()], "empty_credential"),
            (vec!["Basic !!!".into()], "malformed_credential"),
            (vec!["Basic bm9jb2xvbg==".into()], "malformed_credential"),
            (vec!["Bearer ".into()], "empty_credential"),
            (vec!["Digest x".into()], "malformed_credential"),
            (vec!["Bearer a.b".into()], "malformed_token"),
            (
                vec![format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1))],
                "malformed_token",
            ),
            (
                vec![format!("Bearer {}", unsigned(&claims("demo", "default", NOW)))],
                "alg_none",
            ),
            (
                vec![format!(
                    "Bearer {}",
                    sign("other-kid", Algorithm::RS256, &claims("demo", "d", NOW))
                )],
                "unknown_kid",
            ),
            (vec![format!("Bearer {}", tamper(&good))], "bad_signature"),
            (claims_with(|c| c["iss"] = "https://evil".into()), "wrong_issuer"),
            (claims_with(|c| c["aud"] = "other".into()), "wrong_audience"),
            (claims_with(|c| c["exp"] = (NOW - 61).into()), "expired"),
            (claims_with(|c| c["nbf"] = (NOW + 61).into()), "not_yet_valid"),
            (
                claims_with(|c| c["exp"] = (NOW + 366 * 86_400).into()),
                "lifetime_too_long",
            ),
            (
                claims_with(|c| c["exp"] = (NOW + 86_400 + 61).into()),
                "lifetime_too_long",
            ),
            (claims_with(|c| c["exp"] = "soon".into()), "bad_claims"),
            (
                claims_with(|c| drop(c.as_object_mut().map(|o| o.remove("exp")))),
                "bad_claims",
            ),
            (
                claims_with(|c| c["sub"] = "system:serviceaccount:kube-system:admin".into()),
                "bad_claims",
            ),
            (
                claims_with(|c| drop(c.as_object_mut().map(|o| o.remove("kubernetes.io")))),
                "bad_claims",
            ),
            (
                claims_with(|c| c["kubernetes.io"]["namespace"] = 7.into()),
                "bad_claims",
            ),
        ];
        for (values, want) in cases {
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            assert_eq!(reason(&refs, NOW), want, "{values:?}");
        }
    }

    #[test]
    fn skew_is_allowed_up_to_the_configured_bound() {
        let t = sign(
            RSA_KID,
            Algorithm::RS256,
            &with(|c| {
                c["exp"] = (NOW - 59).into();
                c["nbf"] = (NOW + 59).into();
            }),
        );
        assert!(verify(&t, &policy(), NOW).is_ok());
    }

    #[test]
    fn every_rsa_algorithm_verifies_with_its_pre_parsed_key() {
        // The RSA test key configured once per algorithm; a token of each verifies, and a token
        // signed with one hash is refused by the key configured for another.
        for alg in ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"] {
            let mut keys = jwks();
            keys["keys"][0]["alg"] = alg.into();
            let policy = crate::testkeys::policy_with(keys);
            let jwt_alg: Algorithm = alg.parse().unwrap();
            let t = sign(RSA_KID, jwt_alg, &claims("demo", "default", NOW));
            assert!(verify(&t, &policy, NOW).is_ok(), "{alg}");
            let mut other = sign(RSA_KID, jwt_alg, &claims("demo", "default", NOW));
            // Same header, another algorithm's signature over it: fails the check.
            let wrong = if alg == "RS256" {
                Algorithm::RS384
            } else {
                Algorithm::RS256
            };
            let (head, _) = other.rsplit_once('.').unwrap();
            let (_, sig) = sign(RSA_KID, wrong, &claims("demo", "default", NOW))
                .rsplit_once('.')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .unwrap();
            other = format!("{head}.{sig}");
            assert_eq!(
                verify(&other, &policy, NOW).unwrap_err().reason,
                "bad_signature",
                "{alg}"
            );
        }
    }

    thread_local! {
        /// What the test host check was asked: (hash, key bytes).
        static ASKED: std::cell::RefCell<Vec<(String, usize)>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    fn confirms(hash: &str, spki: &[u8], _: &[u8], _: &[u8]) -> Option<bool> {
        ASKED.with(|a| a.borrow_mut().push((hash.to_string(), spki.len())));
        Some(true)
    }

    fn refuses(hash: &str, spki: &[u8], _: &[u8], _: &[u8]) -> Option<bool> {
        ASKED.with(|a| a.borrow_mut().push((hash.to_string(), spki.len())));
        Some(false)
    }

    fn is_missing(_: &str, _: &[u8], _: &[u8], _: &[u8]) -> Option<bool> {
        None
    }

    #[test]
    fn the_hosts_confirmation_answers_for_v15_keys_and_only_a_confirmation_is_taken() {
        let good = sign(RSA_KID, Algorithm::RS256, &claims("demo", "default", NOW));
        let forged = tamper(&good);
        let policy = crate::testkeys::policy();
        // Compiled to wasm the tests share one thread, and so `ASKED`: start from nothing.
        ASKED.with(|a| a.take());
        // Confirmed by the host: that is the answer (Envoy's BoringSSL made the check), with the
        // hash and the key's DER the host needs.
        set_host_check(Some(confirms));
        assert!(verify(&forged, &policy, NOW).is_ok());
        let asked = ASKED.with(|a| a.take());
        assert_eq!(asked.len(), 1);
        assert_eq!(asked[0].0, "sha256");
        assert!(asked[0].1 > 256, "the 2048-bit key's SubjectPublicKeyInfo: {asked:?}");
        // A refusal, or a host without the function: the module checks itself, both ways.
        for host in [refuses as HostCheck, is_missing] {
            set_host_check(Some(host));
            assert!(verify(&good, &policy, NOW).is_ok());
            assert_eq!(verify(&forged, &policy, NOW).unwrap_err().reason, "bad_signature");
        }
        set_host_check(None);
        assert_eq!(verify(&forged, &policy, NOW).unwrap_err().reason, "bad_signature");
    }

    /// An ECDSA token of key `kid` goes to the host with `hash` and the key's DER (`spki_len`
    /// bytes), its signature in DER; the host's confirmation is the answer, a refusal leaves the
    /// check to the module.
    fn ecdsa_asks_the_host(kid: &str, alg: Algorithm, hash: &str, spki_len: usize) {
        let policy = crate::testkeys::policy();
        let ec = sign(kid, alg, &claims("demo", "default", NOW));
        ASKED.with(|a| a.take());
        set_host_check(Some(refuses));
        assert!(
            verify(&ec, &policy, NOW).is_ok(),
            "the module's own check after the refusal"
        );
        let asked = ASKED.with(|a| a.take());
        assert_eq!(asked, [(hash.to_string(), spki_len)], "{alg:?} SubjectPublicKeyInfo");
        // A signature with a byte of r changed: the host's confirmation is the answer, without
        // it the module refuses.
        let (head, sig) = ec.rsplit_once('.').unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        raw[5] ^= 1;
        let forged = format!("{head}.{}", URL_SAFE_NO_PAD.encode(&raw));
        set_host_check(Some(confirms));
        assert!(verify(&forged, &policy, NOW).is_ok());
        set_host_check(None);
        assert_eq!(verify(&forged, &policy, NOW).unwrap_err().reason, "bad_signature");
        assert!(verify(&ec, &policy, NOW).is_ok(), "the module's own {alg:?} check");
        ASKED.with(|a| a.take());
    }

    #[test]
    fn es256_asks_the_host_with_the_signature_in_der_and_pss_never_asks() {
        ecdsa_asks_the_host(EC_KID, Algorithm::ES256, "sha256", 91);
        let mut keys = jwks();
        keys["keys"][0]["alg"] = "PS256".into();
        let pss_policy = crate::testkeys::policy_with(keys);
        let pss = sign(RSA_KID, Algorithm::PS256, &claims("demo", "default", NOW));
        // A host that would answer: PSS is still not offered to it (it would apply v1.5).
        set_host_check(Some(refuses));
        assert_eq!(
            verify(&tamper(&pss), &pss_policy, NOW).unwrap_err().reason,
            "bad_signature"
        );
        assert!(verify(&pss, &pss_policy, NOW).is_ok());
        assert!(ASKED.with(|a| a.take()).is_empty(), "PSS never asks the host");
        set_host_check(None);
    }

    #[test]
    fn es384_asks_the_host_with_sha384_and_the_signature_in_der() {
        ecdsa_asks_the_host(EC384_KID, Algorithm::ES384, "sha384", 120);
    }

    #[test]
    fn an_ec_point_off_the_curve_is_refused_with_the_configuration() {
        let mut keys = jwks();
        // Another y: (x, y) is then not a point of P-256.
        keys["keys"][1]["y"] = URL_SAFE_NO_PAD.encode([7u8; 32]).into();
        let doc = serde_json::json!({
            "identity": {"issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": keys},
            "connectors": [{"namespace": "n", "name": "c", "address": "http://h", "cluster": "c",
                            "credential": {"username": "u", "passwordEnv": "P"}}]
        });
        let errors = crate::config::compile(doc.to_string().as_bytes(), &|_| Some("p".into()))
            .err()
            .unwrap();
        assert!(
            errors.iter().any(|e| e.to_string().contains("not on the curve")),
            "{errors:?}"
        );
    }

    #[test]
    fn header_alg_must_equal_the_keys() {
        // An ES256 signature presented under the RSA key's kid is refused before any crypto.
        let t = sign_with_kid_of(EC_KID, RSA_KID, Algorithm::ES256, &claims("demo", "d", NOW));
        let err = verify(&t, &policy(), NOW).unwrap_err();
        assert_eq!(err.reason, "alg_mismatch");
        // HS256 "signed" with public material: same answer.
        let hs = hs256_token(RSA_KID, &claims("demo", "d", NOW));
        assert_eq!(verify(&hs, &policy(), NOW).unwrap_err().reason, "alg_mismatch");
    }

    #[test]
    fn cache_hits_skip_verification_and_expire_with_the_token() {
        let policy = policy();
        let mut cache = TokenCache::new(2);
        let t = sign(RSA_KID, Algorithm::RS256, &with(|c| c["exp"] = (NOW + 100).into()));
        let v = basic(&t);
        assert!(!authenticate(&[&v], &policy, &mut cache, NOW).unwrap().1);
        assert!(authenticate(&[&v], &policy, &mut cache, NOW + 1).unwrap().1);
        // Past exp + skew the cached entry is gone and verification refuses it.
        assert_eq!(
            authenticate(&[&v], &policy, &mut cache, NOW + 161).unwrap_err().reason,
            "expired"
        );
        assert!(cache.is_empty());
    }

    #[test]
    fn a_new_configuration_keeps_tokens_whose_key_stayed_and_evicts_exactly_a_removed_keys() {
        let old = policy();
        let mut cache = TokenCache::new(8);
        let rsa = format!(
            "Bearer {}",
            sign(RSA_KID, Algorithm::RS256, &claims("demo", "rsa", NOW))
        );
        let ec = format!("Bearer {}", sign(EC_KID, Algorithm::ES256, &claims("demo", "ec", NOW)));
        for t in [&rsa, &ec] {
            assert!(!authenticate(&[t.as_str()], &old, &mut cache, NOW).unwrap().1);
        }
        // The same configuration again (a push that changed something else): both stay verified.
        let same = policy();
        let mut cache = cache.carry_over(&old, &same, 8);
        for t in [&rsa, &ec] {
            assert!(
                authenticate(&[t.as_str()], &same, &mut cache, NOW).unwrap().1,
                "still a hit"
            );
        }
        // The EC key removed: its token is gone (refused now), the RSA key's stays a hit.
        let mut keys = jwks();
        keys["keys"].as_array_mut().unwrap().remove(1);
        let without_ec = crate::testkeys::policy_with(keys);
        let mut cache = cache.carry_over(&same, &without_ec, 8);
        assert_eq!(cache.len(), 1);
        assert!(authenticate(&[rsa.as_str()], &without_ec, &mut cache, NOW).unwrap().1);
        assert_eq!(
            authenticate(&[ec.as_str()], &without_ec, &mut cache, NOW)
                .unwrap_err()
                .reason,
            "unknown_kid"
        );
        // The same kid now naming another key (the RSA key's material under the EC kid is not
        // possible here; change its algorithm instead): its tokens are checked again.
        let mut keys = jwks();
        keys["keys"].as_array_mut().unwrap().remove(1);
        keys["keys"][0]["alg"] = "PS256".into();
        let ps = crate::testkeys::policy_with(keys);
        let cache = cache.carry_over(&without_ec, &ps, 8);
        assert!(cache.is_empty());
        // Another audience list: nothing verified under the old claims policy is kept.
        let mut cache = TokenCache::new(8);
        authenticate(&[rsa.as_str()], &old, &mut cache, NOW).unwrap();
        let mut other = policy();
        other.audiences.insert("another".into());
        assert!(cache.carry_over(&old, &other, 8).is_empty());
    }

    #[test]
    fn cache_is_bounded() {
        let mut cache = TokenCache::new(3);
        let id = |exp| Rc::new(Identity::new("n", "s", exp, Bound::default()));
        cache.insert("a", id(NOW + 10), "k");
        cache.insert("b", id(NOW + 1000), "k");
        cache.insert("c", id(NOW + 1000), "k");
        // An expired entry is dropped when looked up.
        assert!(cache.get("a", NOW + 20, 0).is_none());
        assert_eq!(cache.len(), 2);
        cache.insert("d", id(NOW + 1000), "k");
        cache.insert("e", id(NOW + 1000), "k");
        // Full: the oldest live entry ("b") went.
        assert_eq!(cache.len(), 3);
        assert!(cache.get("b", NOW + 20, 0).is_none());
        for k in ["c", "d", "e"] {
            assert!(cache.get(k, NOW + 20, 0).is_some(), "{k}");
        }
        // A stream of new tokens keeps the size and the bookkeeping bounded.
        for i in 0..100 {
            cache.insert(&format!("t{i}"), id(NOW + 1000), "k");
        }
        assert_eq!(cache.len(), 3);
        assert!(cache.order.len() <= 6);
    }
}
