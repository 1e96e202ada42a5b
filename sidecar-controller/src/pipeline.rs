//! Owns the step from desired state ([`Inputs`]) to what Envoy and the filter get: the filter
//! configuration (ECDS), the upstream clusters (CDS), and the credential table the loopback
//! channel serves. Pure, so it is tested without Envoy.
//!
//! Unlike `render` (file mode's one-shot output, refused as a whole), a live controller keeps
//! serving the connectors that are fine: a connector whose Secret is missing is *left out*,
//! with its problems, and reported in its status; the others go on. Problems of the input as a
//! whole (identity) refuse the whole configuration and the previous one stays in Envoy.
//!
//! No secret enters the configuration: each connector carries `{"fromController": <revision>}`,
//! where the revision is a keyed digest of the credential under a key drawn at start-up and
//! never written anywhere. It changes whenever the credential does (so Envoy gets a new
//! configuration and the filter drops its caches), reveals nothing about the password, and
//! differs after a controller restart (so a credential changed while the controller was down is
//! never hidden behind an unchanged configuration).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use connector_filter::config::Upstream;

use crate::hub::{Authorization, ConnectorKey, Inputs};
use crate::manifests::Problem;
use crate::render::{UpstreamCluster, add_cluster, cluster_for, filter_entry, locate, realm_origin};
use crate::secrets::{Credential, credential_from_secret};

/// How the configuration reaches the controller's channel from inside Envoy.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    /// The Envoy cluster (in Envoy's bootstrap) that reaches the channel on loopback.
    pub cluster: String,
    /// Name of the environment variable holding the channel key in Envoy's process, when the
    /// channel requires one.
    pub key_env: Option<String>,
}

/// The result of one render: what goes to Envoy, and what stays in the controller.
#[derive(Clone)]
pub struct Rendering {
    pub filter_config: Value,
    pub clusters: Vec<UpstreamCluster>,
    /// The credential of each configured connector, served over the channel only.
    pub credentials: HashMap<ConnectorKey, Credential>,
    pub connectors: BTreeSet<ConnectorKey>,
    pub left_out: BTreeMap<ConnectorKey, Vec<Problem>>,
}

impl std::fmt::Debug for Rendering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendering")
            .field("filter_config", &self.filter_config)
            .field("clusters", &self.clusters)
            .field("connectors", &self.connectors)
            .field("left_out", &self.left_out)
            .finish_non_exhaustive()
    }
}

/// Keyed digests of credentials (see the module docs).
pub struct Revisions {
    key: [u8; 32],
}

impl Revisions {
    /// A fresh key from the OS (`/dev/urandom`), falling back to time and pid mixed: the
    /// revision's secrecy rests on the key only against offline guessing of weak passwords.
    pub fn new() -> Self {
        let mut key = [0u8; 32];
        let read = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key));
        if read.is_err() {
            let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
            key.copy_from_slice(&Sha256::digest(seed.as_bytes()));
        }
        Self { key }
    }

    pub fn with_key(key: [u8; 32]) -> Self {
        Self { key }
    }

    pub fn of(&self, c: &Credential) -> String {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update(c.username.as_bytes());
        h.update([0u8]);
        h.update(c.password.as_bytes());
        h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

impl Default for Revisions {
    fn default() -> Self {
        Self::new()
    }
}

/// Renders `inputs`. `Err` only for problems of the whole (the identity settings, or a
/// configuration the filter would refuse for reasons no single connector explains).
pub fn render_live(
    inputs: &Inputs,
    channel: &ChannelSettings,
    revisions: &Revisions,
) -> Result<Rendering, Vec<Problem>> {
    let mut left_out: BTreeMap<ConnectorKey, Vec<Problem>> = BTreeMap::new();
    let mut clusters: BTreeMap<String, (UpstreamCluster, String)> = BTreeMap::new();
    let mut credentials = HashMap::new();
    let mut entries: Vec<(ConnectorKey, String, Value, Vec<UpstreamCluster>)> = vec![];
    for (at, c) in &inputs.set.connectors {
        let key = (
            c.metadata.namespace.clone().unwrap_or_default(),
            c.metadata.name.clone().unwrap_or_default(),
        );
        let mut problems = vec![];
        let upstream = Upstream::parse(&c.spec.address)
            .map_err(|e| problems.push(Problem::new(at, "spec.address", e)))
            .ok();
        let secret_name = &c.spec.auth.secret_ref.name;
        let authority = upstream.as_ref().map(|u| u.authority.as_str()).unwrap_or_default();
        let outcome = credential_from_secret(&key.0, secret_name, inputs.set.secret(&key.0, secret_name), authority);
        if !outcome.condition.status {
            problems.push(Problem::new(
                at,
                "spec.auth.secretRef.name",
                format!("{}: {}", outcome.condition.reason.as_str(), outcome.condition.message),
            ));
        }
        let mut own_clusters = vec![];
        let mut realms = vec![];
        for (i, realm) in c.spec.token_realms.iter().enumerate() {
            match realm_origin(&realm.url) {
                Ok(u) => {
                    let mut cl = cluster_for(&u);
                    if let Some(named) = &realm.cluster {
                        cl.name.clone_from(named);
                    }
                    realms.push(json!({ "url": realm.url, "cluster": cl.name }));
                    own_clusters.push(cl);
                }
                Err(e) => problems.push(Problem::new(at, format!("spec.tokenRealms[{i}].url"), e)),
            }
        }
        let (Some(upstream), Some(credential), true) = (upstream, outcome.credential, problems.is_empty()) else {
            left_out.insert(key, problems);
            continue;
        };
        let cluster = cluster_for(&upstream);
        let entry = filter_entry(
            c,
            &cluster.name,
            json!({ "fromController": revisions.of(&credential) }),
            realms,
        );
        own_clusters.insert(0, cluster);
        credentials.insert(key.clone(), credential);
        entries.push((key, at.to_string(), entry, own_clusters));
    }

    // Clusters: a name claimed for two origins leaves out the later connector.
    entries.retain(|(key, at_label, _, own)| {
        let mut problems = vec![];
        let mut trial = clusters.clone();
        let at = crate::manifests::Location {
            file: at_label.into(),
            index: 0,
        };
        for cl in own {
            add_cluster(&mut trial, cl.clone(), &at, "spec", &mut problems);
        }
        if problems.is_empty() {
            clusters = trial;
            true
        } else {
            left_out.insert(key.clone(), problems);
            false
        }
    });

    // The filter's own validator has the last word; a connector it refuses is left out and the
    // rest validated again (twice at most: the second pass can only fail on the whole).
    let key_env = channel.key_env.clone();
    let lookup = move |name: &str| (Some(name) == key_env.as_deref()).then(|| "present".to_string());
    for _ in 0..2 {
        let mut doc = json!({
            "identity": inputs.identity,
            "controller": { "cluster": channel.cluster },
            "authorization": match inputs.authorization { Authorization::Rules => "rules", Authorization::Controller => "controller" },
            "connectors": entries.iter().map(|(_, _, e, _)| e.clone()).collect::<Vec<_>>(),
        });
        if let Some(var) = &channel.key_env {
            doc["controller"]["keyEnv"] = json!(var);
        }
        let origins: Vec<String> = entries.iter().map(|(_, at, _, _)| at.clone()).collect();
        let errors = match connector_filter::config::compile(doc.to_string().as_bytes(), &lookup) {
            Ok(_) => {
                let used: BTreeSet<&str> = entries
                    .iter()
                    .flat_map(|(_, _, _, own)| own.iter().map(|c| c.name.as_str()))
                    .collect();
                let connectors: BTreeSet<ConnectorKey> = entries.iter().map(|(k, ..)| k.clone()).collect();
                credentials.retain(|k, _| connectors.contains(k));
                return Ok(Rendering {
                    filter_config: doc,
                    clusters: clusters
                        .into_values()
                        .map(|(c, _)| c)
                        .filter(|c| used.contains(c.name.as_str()))
                        .collect(),
                    credentials,
                    connectors,
                    left_out,
                });
            }
            Err(errors) => errors,
        };
        let mut whole = vec![];
        let mut bad: BTreeMap<usize, Vec<Problem>> = BTreeMap::new();
        for e in errors {
            let index = e
                .path
                .strip_prefix("connectors[")
                .and_then(|r| r.split_once(']'))
                .and_then(|(i, _)| i.parse::<usize>().ok())
                .filter(|i| *i < entries.len());
            let p = locate(e, &origins, "identity");
            match index {
                Some(i) => bad.entry(i).or_default().push(p),
                None => whole.push(p),
            }
        }
        if !whole.is_empty() {
            return Err(whole);
        }
        for (i, problems) in bad.into_iter().rev() {
            let (key, ..) = entries.remove(i);
            left_out.insert(key, problems);
        }
    }
    Err(vec![Problem::new(
        "filter configuration",
        "",
        "the filter refused the configuration after every reported connector was left out",
    )])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::{ManifestSet, parse_file};

    const IDENTITY_KEY_N: &str = "7G7S06o6LC9D90t0mSQpgH47Q_bOGioa68ApIuEEAX7ZO_D-wur2Yu_Fg8LIUjHuJDhMcJdQ5zLD-ATufSaLkg3dImGjTHBEKJJIxEJWG7eDznV3PoQZpOUNSfmU5Wj8qV8nkAvxOUDxUXt8Y_HSr1MiuSJQqOx5ZsuzOJiwBFxKzf6cLa-Y4Ov_mB9stvhxlYFHd3m-MOtr9EuMgwWSf47vuu3zL3uL5WHCIZEHbYAp37-_Yfl5ZgvahV2cr6iHcWF7aoKSt6CO5lbjaRwmwkPgd1BVR11rr45cpXt5THYaAv6mXWBVKgjBDPXX6h_4KibHqHU07iTuNvExpugxOw";

    fn inputs(yaml: &str, authorization: Authorization) -> Inputs {
        let mut set = ManifestSet::default();
        let mut problems = vec![];
        parse_file(std::path::Path::new("m.yaml"), yaml, &mut set, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        Inputs {
            set,
            identity: json!({"issuers": ["https://k8s"], "audiences": ["oci-connector"],
                "jwks": {"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "n": IDENTITY_KEY_N, "e": "AQAB"}]}}),
            authorization,
        }
    }

    fn connector(name: &str, address: &str, secret: &str) -> String {
        format!(
            "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  address: {address}\n  auth: {{name: basicAuth, secretRef: {{name: {secret}}}}}\n  connectorClassName: oci\n---\n"
        )
    }

    fn secret(name: &str, password: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: demo}}\ntype: kubernetes.io/basic-auth\nstringData: {{username: robot, password: {password}}}\n---\n"
        )
    }

    fn channel() -> ChannelSettings {
        ChannelSettings {
            cluster: "connector_controller".into(),
            key_env: Some("CONNECTOR_CHANNEL_KEY".into()),
        }
    }

    #[test]
    fn good_connectors_are_served_and_bad_ones_left_out_with_their_problems() {
        let yaml = [
            connector("good", "http://127.0.0.1:5000", "robot"),
            connector("nosecret", "http://127.0.0.1:5001", "missing"),
            connector("badaddr", "ftp://x", "robot"),
            secret("robot", "pa55-word"),
        ]
        .concat();
        let r = render_live(
            &inputs(&yaml, Authorization::Rules),
            &channel(),
            &Revisions::with_key([7; 32]),
        )
        .unwrap();
        let good = ("demo".to_string(), "good".to_string());
        assert_eq!(r.connectors, [good.clone()].into());
        assert_eq!(r.left_out.len(), 2);
        let why = |n: &str| r.left_out[&("demo".to_string(), n.to_string())][0].to_string();
        assert!(why("nosecret").contains("SecretNotFound"), "{}", why("nosecret"));
        assert!(why("badaddr").contains("spec.address"), "{}", why("badaddr"));
        assert_eq!(
            r.clusters.len(),
            1,
            "only the served connector's cluster: {:?}",
            r.clusters
        );
        assert_eq!(r.credentials[&good].password, "pa55-word");
        let text = r.filter_config.to_string();
        assert!(!text.contains("pa55-word"), "no secret in the configuration: {text}");
        assert_eq!(r.filter_config["controller"]["keyEnv"], "CONNECTOR_CHANNEL_KEY");
        assert_eq!(r.filter_config["authorization"], "rules");
        assert!(!format!("{r:?}").contains("pa55-word"));
    }

    #[test]
    fn the_revision_follows_the_credential_and_the_key() {
        let run = |pw: &str, key: u8| {
            let yaml = [connector("good", "http://127.0.0.1:5000", "robot"), secret("robot", pw)].concat();
            let r = render_live(
                &inputs(&yaml, Authorization::Controller),
                &channel(),
                &Revisions::with_key([key; 32]),
            )
            .unwrap();
            r.filter_config["connectors"][0]["credential"]["fromController"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(run("one", 1), run("one", 1), "stable for the same credential");
        assert_ne!(
            run("one", 1),
            run("two", 1),
            "a rotated Secret changes the configuration"
        );
        assert_ne!(run("one", 1), run("one", 2), "a restarted controller changes it too");
    }

    #[test]
    fn no_connectors_is_a_valid_configuration_and_a_bad_identity_refuses_the_whole() {
        let r = render_live(&inputs("", Authorization::Rules), &channel(), &Revisions::new()).unwrap();
        assert!(r.connectors.is_empty());
        assert_eq!(r.filter_config["connectors"], json!([]));
        let mut i = inputs(
            &[
                connector("good", "http://127.0.0.1:5000", "robot"),
                secret("robot", "x"),
            ]
            .concat(),
            Authorization::Rules,
        );
        i.identity = json!({"issuers": []});
        let problems = render_live(&i, &channel(), &Revisions::new()).unwrap_err();
        assert!(problems.iter().any(|p| p.path.contains("identity")), "{problems:?}");
    }
}
