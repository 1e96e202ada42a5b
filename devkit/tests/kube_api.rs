//! Self-test of the stand-in Kubernetes API server with the real kube-rs client: every call the
//! sidecar controller makes (CRUD, patches on the status subresource, watcher + reflector, the
//! events Recorder, access and token reviews) must behave as against a real API server.

use base64::Engine;
use connector_devkit::http::Request;
use connector_devkit::kube_api::{AccessRule, KubeApi};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, Config};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn client(kube: &KubeApi) -> Client {
    let url = kube.url().parse().expect("url parses");
    Client::try_from(Config::new(url)).expect("client builds")
}

fn connector_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("connectors.alauda.io", "v1alpha1", "Connector");
    ApiResource::from_gvk_with_plural(&gvk, "connectors")
}

/// The Status of a failed kube call, or a panic naming what came back instead.
fn api_error<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> Box<kube::core::Status> {
    match r {
        Err(kube::Error::Api(s)) => s,
        other => panic!("expected an API error Status, got {other:?}"),
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn rv_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .expect("resourceVersion")
        .parse()
        .expect("decimal resourceVersion")
}

/// A raw request with a JSON body: (status, JSON body).
fn raw(kube: &KubeApi, method: &str, path: &str, content_type: &str, body: &Value) -> (u16, Value) {
    let mut req = Request::new(method, path).header("Content-Type", content_type);
    req.body = serde_json::to_vec(body).unwrap();
    let resp = req.send(kube.port()).expect("raw request");
    let json = resp.json().unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (resp.status, json)
}

/// A raw GET: (status, JSON body).
fn raw_get(kube: &KubeApi, path: &str) -> (u16, Value) {
    let resp = Request::get(path).send(kube.port()).expect("raw GET");
    let json = resp.json().unwrap_or_else(|e| panic!("GET {path}: {e}"));
    (resp.status, json)
}

/// Polls `f` until it holds or `within` passes.
async fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_crud_and_patches_with_kube_client() {
    let kube = KubeApi::start().expect("start");
    let secrets: Api<Secret> = Api::namespaced(client(&kube), "team-a");

    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "pull", "namespace": "team-a", "labels": {"app": "x"}},
        "type": "Opaque",
        "stringData": {"password": "hunter2"},
    }))
    .unwrap();
    let created = secrets.create(&PostParams::default(), &s).await.expect("create");
    let created_v = serde_json::to_value(&created).unwrap();
    assert_eq!(
        created_v["data"]["password"],
        json!(b64("hunter2")),
        "stringData stored as data: {created_v}"
    );
    assert!(
        created_v.get("stringData").is_none(),
        "stringData is not stored: {created_v}"
    );
    assert!(
        created.metadata.uid.as_deref().is_some_and(|u| u.len() == 36),
        "uid: {created_v}"
    );
    assert!(
        created.metadata.creation_timestamp.is_some(),
        "creationTimestamp: {created_v}"
    );
    let rv1 = rv_of(&created_v);

    let dup = api_error(secrets.create(&PostParams::default(), &s).await);
    assert_eq!((dup.code, dup.reason.as_str()), (409, "AlreadyExists"), "{dup:?}");

    let got = secrets.get("pull").await.expect("get");
    assert_eq!(got.metadata.resource_version, created.metadata.resource_version);
    assert_eq!(
        kube.get("v1", "Secret", "team-a", "pull").expect("side get")["data"]["password"],
        json!(b64("hunter2"))
    );

    let missing = api_error(secrets.get("nope").await);
    assert_eq!(
        (missing.code, missing.reason.as_str()),
        (404, "NotFound"),
        "{missing:?}"
    );
    assert_eq!(missing.message, "secrets \"nope\" not found");

    // A second namespace, written from the test side, shows up in the all-namespaces list only.
    kube.apply(json!({"apiVersion": "v1", "kind": "Secret",
                      "metadata": {"name": "other", "namespace": "team-b"}, "data": {"k": b64("v")}}))
        .expect("side apply");
    let in_a = secrets.list(&ListParams::default()).await.expect("list");
    assert_eq!(in_a.items.len(), 1, "{:?}", in_a.items);
    let all = Api::<Secret>::all(client(&kube))
        .list(&ListParams::default())
        .await
        .expect("list all");
    let names: Vec<_> = all.items.iter().filter_map(|s| s.metadata.name.clone()).collect();
    assert_eq!(names, ["pull", "other"]);
    let list_rv: u64 = all.metadata.resource_version.as_deref().unwrap().parse().unwrap();
    assert!(
        list_rv > rv1,
        "list resourceVersion {list_rv} after the second write (> {rv1})"
    );
    let other = kube.get("v1", "Secret", "team-b", "other").expect("side get");
    assert_eq!(other["type"], "Opaque", "type is defaulted: {other}");
    let by_label = secrets
        .list(&ListParams::default().labels("app=y"))
        .await
        .expect("label list");
    assert!(
        by_label.items.is_empty(),
        "labelSelector app=y matched {:?}",
        by_label.items
    );
    let by_field = Api::<Secret>::all(client(&kube))
        .list(&ListParams::default().fields("metadata.name=other"))
        .await
        .expect("field list");
    assert_eq!(by_field.items.len(), 1);

    // Merge patch with stringData, then a JSON patch removing a key.
    let merged = secrets
        .patch(
            "pull",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"user": "bob"}})),
        )
        .await
        .expect("merge patch");
    let merged_v = serde_json::to_value(&merged).unwrap();
    assert_eq!(
        merged_v["data"],
        json!({"password": b64("hunter2"), "user": b64("bob")}),
        "{merged_v}"
    );
    assert!(rv_of(&merged_v) > list_rv, "a write bumps the resourceVersion");
    // kube's Patch::Json needs its jsonpatch feature; send the RFC 6902 patch as raw HTTP.
    let ops = json!([
        {"op": "remove", "path": "/data/user"},
        {"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}},
    ]);
    let patched = raw(
        &kube,
        "PATCH",
        "/api/v1/namespaces/team-a/secrets/pull",
        "application/json-patch+json",
        &ops,
    );
    assert_eq!(patched.0, 200, "{}", patched.1);
    assert_eq!(patched.1["data"], json!({"password": b64("hunter2")}), "{}", patched.1);
    assert_eq!(patched.1["metadata"]["annotations"], json!({"a": "b"}));
    let bad = json!([{"op": "remove", "path": "/data/absent"}]);
    let refused = raw(
        &kube,
        "PATCH",
        "/api/v1/namespaces/team-a/secrets/pull",
        "application/json-patch+json",
        &bad,
    );
    assert_eq!(
        (refused.0, refused.1["kind"].as_str()),
        (422, Some("Status")),
        "{}",
        refused.1
    );

    // PUT with a stale resourceVersion is a conflict.
    let mut stale = created.clone();
    stale.data = None;
    let conflict = api_error(secrets.replace("pull", &PostParams::default(), &stale).await);
    assert_eq!(
        (conflict.code, conflict.reason.as_str()),
        (409, "Conflict"),
        "{conflict:?}"
    );

    let deleted = secrets.delete("pull", &DeleteParams::default()).await.expect("delete");
    let deleted = deleted.left().expect("the deleted object comes back");
    assert_eq!(deleted.metadata.name.as_deref(), Some("pull"));
    assert_eq!(api_error(secrets.get("pull").await).code, 404);
    assert!(kube.get("v1", "Secret", "team-a", "pull").is_none());
    assert!(kube.delete("v1", "Secret", "team-b", "other"));
    assert!(!kube.delete("v1", "Secret", "team-b", "other"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_status_subresource_and_generation() {
    let kube = KubeApi::start().expect("start");
    let ar = connector_resource();
    let connectors: Api<DynamicObject> = Api::namespaced_with(client(&kube), "ns1", &ar);

    let mut c = DynamicObject::new("reg", &ar).within("ns1");
    c.data = json!({"spec": {"address": "registry.example:5000"}, "status": {"phase": "Forged"}});
    let created = connectors
        .create(&PostParams::default(), &c)
        .await
        .expect("create connector");
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(created.data["spec"]["address"], "registry.example:5000");
    assert!(
        created.data.get("status").is_none(),
        "create ignores .status: {:?}",
        created.data
    );
    assert_eq!(created.types.as_ref().map(|t| t.kind.as_str()), Some("Connector"));

    // Merge patch on /status: only .status changes, generation stays.
    let patch = json!({"spec": {"address": "evil:1"}, "status": {"phase": "Ready"}});
    let after = connectors
        .patch_status("reg", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch_status merge");
    assert_eq!(
        after.data["spec"]["address"], "registry.example:5000",
        "{:?}",
        after.data
    );
    assert_eq!(after.data["status"]["phase"], "Ready");
    assert_eq!(after.metadata.generation, Some(1));
    let rv = |o: &DynamicObject| o.metadata.resource_version.as_deref().unwrap().parse::<u64>().unwrap();
    assert!(rv(&after) > rv(&created), "a status write bumps the resourceVersion");

    // Server-side apply on /status, forced, as the controller does.
    let apply = json!({
        "apiVersion": "connectors.alauda.io/v1alpha1",
        "kind": "Connector",
        "spec": {"address": "evil:2"},
        "status": {"phase": "Degraded", "conditions": [{"type": "Ready", "status": "False"}]},
    });
    let applied = connectors
        .patch_status("reg", &PatchParams::apply("test").force(), &Patch::Apply(&apply))
        .await
        .expect("patch_status apply");
    assert_eq!(
        applied.data["spec"]["address"], "registry.example:5000",
        "{:?}",
        applied.data
    );
    assert_eq!(applied.data["status"]["phase"], "Degraded");
    assert_eq!(applied.data["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(applied.metadata.generation, Some(1));
    let applied_query = kube
        .requests()
        .into_iter()
        .find(|(m, p)| m == "PATCH" && p.contains("fieldManager=test"));
    assert!(
        applied_query.is_some_and(|(_, p)| p.contains("force=true")),
        "{:?}",
        kube.requests()
    );

    // PUT on /status changes only .status; PUT on the main resource keeps the stored .status.
    let mut put = applied.clone();
    put.data["spec"]["address"] = json!("evil:3");
    put.data["status"]["phase"] = json!("Replaced");
    let replaced = connectors.replace_status("reg", &PostParams::default(), &put).await;
    let replaced = replaced.expect("replace_status");
    assert_eq!(
        replaced.data["spec"]["address"], "registry.example:5000",
        "{:?}",
        replaced.data
    );
    assert_eq!(
        (replaced.data["status"]["phase"].as_str(), replaced.metadata.generation),
        (Some("Replaced"), Some(1))
    );
    let mut put = replaced.clone();
    put.data["status"]["phase"] = json!("Sneaky");
    let kept = connectors
        .replace("reg", &PostParams::default(), &put)
        .await
        .expect("replace");
    assert_eq!(kept.data["status"]["phase"], "Replaced", "{:?}", kept.data);
    assert!(
        rv(&kept) == rv(&replaced),
        "a PUT that changes nothing is a no-op, as on a real server"
    );
    put.metadata.resource_version = applied.metadata.resource_version.clone();
    let stale = api_error(connectors.replace("reg", &PostParams::default(), &put).await);
    assert_eq!((stale.code, stale.reason.as_str()), (409, "Conflict"), "{stale:?}");

    // A spec change on the main resource bumps generation and keeps .status.
    let changed = connectors
        .patch(
            "reg",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"address": "new:5000"}, "status": {"phase": "Ignored"}})),
        )
        .await
        .expect("patch spec");
    assert_eq!(changed.metadata.generation, Some(2));
    assert_eq!(changed.data["spec"]["address"], "new:5000");
    assert_eq!(
        changed.data["status"]["phase"], "Replaced",
        "main-resource patches ignore .status"
    );
    // A label change is not a spec change.
    let labelled = connectors
        .patch(
            "reg",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"l": "1"}}})),
        )
        .await
        .expect("patch labels");
    assert_eq!(labelled.metadata.generation, Some(2));
    // Server-side apply on the main resource creates a missing object.
    let fresh = json!({"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
                       "metadata": {"name": "applied", "namespace": "ns1"}, "spec": {"address": "a:1"}});
    let made = connectors
        .patch("applied", &PatchParams::apply("test"), &Patch::Apply(&fresh))
        .await
        .expect("apply creates");
    assert_eq!(
        (made.metadata.generation, made.data["spec"]["address"].as_str()),
        (Some(1), Some("a:1"))
    );

    // The 404 Status has the API server's exact shape.
    let (code, body) = raw_get(&kube, "/apis/connectors.alauda.io/v1alpha1/namespaces/ns1/connectors/x");
    assert_eq!(code, 404);
    assert_eq!(
        body,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "connectors.connectors.alauda.io \"x\" not found", "reason": "NotFound",
               "details": {"name": "x", "group": "connectors.alauda.io", "kind": "connectors"}, "code": 404})
    );
    // The list carries kind/apiVersion on the list and on every item.
    let (code, list) = raw_get(&kube, "/apis/connectors.alauda.io/v1alpha1/connectors");
    assert_eq!((code, list["kind"].as_str()), (200, Some("ConnectorList")), "{list}");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(2), "{list}");
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["kind"] == "Connector" && i["apiVersion"] == ar.api_version)
    );
    let side = kube
        .get("connectors.alauda.io/v1alpha1", "Connector", "ns1", "reg")
        .expect("side get");
    assert_eq!(side["status"]["phase"], "Replaced");

    // Unknown paths are 404 Status; a body that is not JSON is a 400 Status naming the problem.
    let (code, body) = raw_get(&kube, "/apis/nope.example/v1/things");
    assert_eq!(
        (code, body["kind"].as_str(), body["reason"].as_str()),
        (404, Some("Status"), Some("NotFound"))
    );
    let mut req = Request::new("POST", "/apis/connectors.alauda.io/v1alpha1/namespaces/ns1/connectors")
        .header("Content-Type", "application/json");
    req.body = b"{not json".to_vec();
    let resp = req.send(kube.port()).expect("send");
    let body = resp.json().expect("Status JSON");
    assert_eq!(
        (resp.status, body["reason"].as_str()),
        (400, Some("BadRequest")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("JSON"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_and_reflector_follow_changes_and_survive_broken_watches() {
    use futures::StreamExt;
    use kube::runtime::reflector::{self, ObjectRef};
    use kube::runtime::{WatchStreamExt, watcher};

    let kube = KubeApi::start().expect("start");
    let ar = connector_resource();
    let api: Api<DynamicObject> = Api::all_with(client(&kube), &ar);
    let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
    let store = writer.as_reader();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    let driver = tokio::spawn(stream.for_each(|_| async {}));
    tokio::time::timeout(Duration::from_secs(5), store.wait_until_ready())
        .await
        .expect("store ready within 5 s")
        .expect("store ready");

    let key = ObjectRef::<DynamicObject>::new_with("w1", ar.clone()).within("ns1");
    let spec_of = |store: &reflector::Store<DynamicObject>| {
        store
            .get(&key)
            .map(|o| o.data["spec"]["address"].as_str().unwrap_or("").to_string())
    };
    let connector = |address: &str| {
        json!({"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
               "metadata": {"name": "w1", "namespace": "ns1"}, "spec": {"address": address}})
    };

    kube.apply(connector("a:1")).expect("add");
    let secs = Duration::from_secs(5);
    eventually(secs, "the store to see the add", || {
        spec_of(&store).as_deref() == Some("a:1")
    })
    .await;
    // A modify through the real client's API.
    let namespaced: Api<DynamicObject> = Api::namespaced_with(client(&kube), "ns1", &ar);
    namespaced
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"address": "b:2"}})),
        )
        .await
        .expect("patch");
    eventually(secs, "the store to see the modify", || {
        spec_of(&store).as_deref() == Some("b:2")
    })
    .await;

    let watches = |kube: &KubeApi| {
        kube.requests()
            .iter()
            .filter(|(m, p)| m == "GET" && p.contains("watch="))
            .count()
    };
    let before = watches(&kube);
    assert!(before >= 1, "the watcher watched: {:?}", kube.requests());
    kube.break_watches();
    eventually(secs, "the watcher to watch again", || watches(&kube) > before).await;
    kube.apply(connector("c:3")).expect("modify after break");
    eventually(secs, "the store to see a modify after break_watches", || {
        spec_of(&store).as_deref() == Some("c:3")
    })
    .await;
    // The re-watch resumed from the last resourceVersion seen, not from scratch.
    let rewatch = kube
        .requests()
        .into_iter()
        .filter(|(_, p)| p.contains("watch="))
        .nth(before)
        .unwrap();
    assert!(rewatch.1.contains("resourceVersion="), "{rewatch:?}");

    assert!(kube.delete("connectors.alauda.io/v1alpha1", "Connector", "ns1", "w1"));
    eventually(secs, "the store to see the delete", || spec_of(&store).is_none()).await;
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_watch_replays_history_and_expires_old_versions() {
    let kube = KubeApi::start().expect("start");
    let secret = |name: &str, v: &str| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "w"},
               "data": {"k": b64(v)}})
    };
    // A write elsewhere first, so the watch below resumes from a real, non-zero resourceVersion.
    let mut seed = secret("seed", "0");
    seed["metadata"]["namespace"] = json!("elsewhere");
    let rv0 = rv_of(&kube.apply(seed).unwrap());
    kube.apply(secret("s1", "1")).unwrap();
    kube.apply(secret("s2", "1")).unwrap();
    kube.apply(secret("s1", "2")).unwrap();

    let watch = |query: String| {
        let resp = Request::get(&format!("/api/v1/namespaces/w/secrets?watch=true&{query}"))
            .send(kube.port())
            .expect("watch");
        assert_eq!(resp.status, 200, "{}", resp.summary());
        assert_eq!(resp.header("transfer-encoding"), Some("chunked"), "{}", resp.summary());
        let lines: Vec<Value> = resp
            .body_text()
            .lines()
            .map(|l| serde_json::from_str(l).expect("event JSON"))
            .collect();
        lines
    };
    let replay = watch(format!("resourceVersion={rv0}&timeoutSeconds=1"));
    let kinds: Vec<_> = replay
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["object"]["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [("ADDED", "s1"), ("ADDED", "s2"), ("MODIFIED", "s1")],
        "{replay:?}"
    );
    let named = watch(format!(
        "resourceVersion={rv0}&timeoutSeconds=1&fieldSelector=metadata.name%3Ds2"
    ));
    assert_eq!(named.len(), 1, "{named:?}");
    let fresh = watch("resourceVersion=0&timeoutSeconds=1".into());
    assert!(fresh.is_empty(), "RV 0 starts from now: {fresh:?}");
    let bookmarks = watch("timeoutSeconds=1&allowWatchBookmarks=true".into());
    assert!(
        bookmarks.iter().all(|e| e["type"] == "BOOKMARK") && !bookmarks.is_empty(),
        "{bookmarks:?}"
    );

    // Push the first writes out of the retained history: a watch from there gets 410 Expired.
    for i in 0..2100 {
        kube.apply(secret("churn", &i.to_string())).unwrap();
    }
    let expired = watch(format!("resourceVersion={rv0}&timeoutSeconds=5"));
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0]["type"], "ERROR");
    assert_eq!(
        (
            expired[0]["object"]["code"].as_u64(),
            expired[0]["object"]["reason"].as_str()
        ),
        (Some(410), Some("Expired"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorder_publishes_events_to_both_event_apis() {
    use k8s_openapi::api::core::v1::ObjectReference;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};

    let kube = KubeApi::start().expect("start");
    let recorder = Recorder::new(
        client(&kube),
        Reporter {
            controller: "connector-controller".into(),
            instance: Some("pod-1".into()),
        },
    );
    let regarding = ObjectReference {
        api_version: Some("connectors.alauda.io/v1alpha1".into()),
        kind: Some("Connector".into()),
        name: Some("reg".into()),
        namespace: Some("ns1".into()),
        uid: Some("0000-uid".into()),
        ..ObjectReference::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "UpstreamUnreachable".into(),
        note: Some("dial tcp: connection refused".into()),
        action: "Probe".into(),
        secondary: None,
    };
    recorder.publish(&event, &regarding).await.expect("publish");
    let events = kube.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(
        (e["apiVersion"].as_str(), e["kind"].as_str()),
        (Some("events.k8s.io/v1"), Some("Event"))
    );
    assert_eq!(e["reason"], "UpstreamUnreachable");
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["note"], "dial tcp: connection refused");
    assert_eq!(e["regarding"]["name"], "reg");
    assert_eq!(e["metadata"]["namespace"], "ns1");
    assert_eq!(e["reportingController"], "connector-controller");

    // The same event again becomes a series: the Recorder PATCHes the existing Event.
    recorder.publish(&event, &regarding).await.expect("publish again");
    let events = kube.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["series"]["count"], 2, "{:?}", events[0]);
    assert!(
        kube.requests()
            .iter()
            .any(|(m, p)| m == "PATCH" && p.starts_with("/apis/events.k8s.io/v1/namespaces/ns1/events/"))
    );

    // A core v1 Event (the older API) is an event too, listed after the first.
    let core = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "old.1", "namespace": "ns1"},
                      "reason": "Legacy", "involvedObject": {"kind": "Connector", "name": "reg"}});
    let (code, _) = raw(
        &kube,
        "POST",
        "/api/v1/namespaces/ns1/events",
        "application/json",
        &core,
    );
    assert_eq!(code, 201);
    let reasons: Vec<_> = kube
        .events()
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(reasons, ["UpstreamUnreachable", "Legacy"]);
    let (code, list) = raw_get(&kube, "/apis/events.k8s.io/v1/namespaces/ns1/events");
    assert_eq!((code, list["items"].as_array().map(Vec::len)), (200, Some(1)), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_and_token_reviews_follow_the_test_tables() {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};

    let kube = KubeApi::start().expect("start");
    let sars: Api<SubjectAccessReview> = Api::all(client(&kube));
    let review = |user: &str, groups: &[&str], verb: &str, subresource: Option<&str>| SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.into()),
            groups: Some(groups.iter().map(|g| g.to_string()).collect()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some("connectors.alauda.io".into()),
                resource: Some("connectors".into()),
                subresource: subresource.map(str::to_string),
                namespace: Some("ns1".into()),
                name: Some("reg".into()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let allowed = |r: SubjectAccessReview| r.status.expect("status").allowed;
    let pp = PostParams::default();
    let sa = "system:serviceaccount:ns1:puller";

    // No rules: denied.
    assert!(!allowed(
        sars.create(&pp, &review(sa, &[], "get", None)).await.expect("sar")
    ));
    kube.allow(AccessRule {
        user: Some(sa.into()),
        verb: "get".into(),
        api_group: "connectors.alauda.io".into(),
        resource: "connectors".into(),
        namespace: "ns1".into(),
        ..AccessRule::default()
    });
    let answer = sars.create(&pp, &review(sa, &[], "get", None)).await.expect("sar");
    assert!(answer.status.as_ref().is_some_and(|s| s.allowed), "{answer:?}");
    assert_eq!(answer.spec.user.as_deref(), Some(sa), "the answer echoes the request");
    assert!(
        !allowed(sars.create(&pp, &review(sa, &[], "get", Some("status"))).await.unwrap()),
        "\"\" subresource"
    );
    assert!(
        !allowed(sars.create(&pp, &review(sa, &[], "delete", None)).await.unwrap()),
        "other verb"
    );
    assert!(
        !allowed(sars.create(&pp, &review("someone", &[], "get", None)).await.unwrap()),
        "other user"
    );
    kube.allow(AccessRule {
        group: Some("pullers".into()),
        verb: "*".into(),
        subresource: "*".into(),
        ..AccessRule::default()
    });
    assert!(allowed(
        sars.create(&pp, &review("someone", &["pullers"], "patch", Some("status")))
            .await
            .unwrap()
    ));
    kube.clear_rules();
    assert!(
        !allowed(sars.create(&pp, &review(sa, &[], "get", None)).await.unwrap()),
        "rules cleared"
    );
    let specs = kube.access_reviews();
    assert_eq!(specs.len(), 7, "{specs:?}");
    assert_eq!(specs[1]["resourceAttributes"]["namespace"], "ns1");
    assert_eq!(specs[5]["groups"], json!(["pullers"]));

    let reviews: Api<TokenReview> = Api::all(client(&kube));
    kube.set_token(
        "good-token",
        sa,
        &["system:serviceaccounts", "system:serviceaccounts:ns1"],
        &["registry", "other"],
    );
    let token_review = |token: &str, audiences: &[&str]| TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.into()),
            audiences: (!audiences.is_empty()).then(|| audiences.iter().map(|a| a.to_string()).collect()),
        },
        ..TokenReview::default()
    };
    let ok = reviews
        .create(&pp, &token_review("good-token", &["registry"]))
        .await
        .expect("token review");
    let status = ok.status.expect("status");
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    let user = status.user.expect("user");
    assert_eq!(user.username.as_deref(), Some(sa));
    assert_eq!(user.groups.map(|g| g.len()), Some(2));
    assert_eq!(status.audiences, Some(vec!["registry".to_string()]));
    let wrong_aud = reviews
        .create(&pp, &token_review("good-token", &["elsewhere"]))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(wrong_aud.authenticated, Some(false), "{wrong_aud:?}");
    let bad = reviews
        .create(&pp, &token_review("forged", &[]))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(bad.authenticated, Some(false), "{bad:?}");
    assert!(bad.error.is_some_and(|e| !e.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_discovery_jwks_discovery_and_unavailability() {
    let kube = KubeApi::start().expect("start");
    kube.set_issuer("https://issuer.test");
    kube.set_jwks(json!({"keys": [{"kty": "RSA", "kid": "one", "n": "AQAB", "e": "AQAB"}]}));
    let resp = Request::get("/.well-known/openid-configuration")
        .send(kube.port())
        .expect("GET");
    let conf = resp.json().expect("json");
    assert_eq!(resp.status, 200);
    assert_eq!(conf["issuer"], "https://issuer.test");
    assert_eq!(conf["jwks_uri"], format!("{}/openid/v1/jwks", kube.url()));
    assert_eq!(conf["id_token_signing_alg_values_supported"], json!(["RS256"]));
    assert_eq!(kube.jwks_requests(), 0);
    let jwks = Request::get("/openid/v1/jwks")
        .send(kube.port())
        .expect("GET jwks")
        .json()
        .unwrap();
    assert_eq!(jwks["keys"][0]["kid"], "one");
    kube.set_jwks(json!({"keys": [{"kty": "RSA", "kid": "two", "n": "AQAB", "e": "AQAB"}]}));
    let jwks = Request::get("/openid/v1/jwks")
        .send(kube.port())
        .expect("GET jwks")
        .json()
        .unwrap();
    assert_eq!(jwks["keys"][0]["kid"], "two");
    assert_eq!(kube.jwks_requests(), 2);

    // kube's own discovery resolves the Connector kind with its status subresource.
    let c = client(&kube);
    let gvk = GroupVersionKind::gvk("connectors.alauda.io", "v1alpha1", "Connector");
    let (ar, caps) = kube::discovery::pinned_kind(&c, &gvk).await.expect("pinned_kind");
    assert_eq!(ar.plural, "connectors");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    assert!(
        caps.subresources.iter().any(|(sr, _)| sr.plural == "status"),
        "{caps:?}"
    );
    let discovery = kube::Discovery::new(c.clone()).run().await.expect("discovery");
    for group in [
        "connectors.alauda.io",
        "events.k8s.io",
        "authorization.k8s.io",
        "authentication.k8s.io",
        "",
    ] {
        assert!(discovery.has_group(group), "discovery lacks group {group:?}");
    }
    let version = c.apiserver_version().await.expect("version");
    assert_eq!(version.major, "1");

    // Unavailable: every request is a 503 Status. kube 5 retries 503 by default (15 times, backoff
    // up to minutes), so the client that must see the failure turns that off.
    let mut config = Config::new(kube.url().parse().unwrap());
    config.default_retry = false;
    let no_retry: Api<Secret> = Api::namespaced(Client::try_from(config).unwrap(), "default");
    kube.set_unavailable(true);
    let down = api_error(no_retry.get("any").await);
    assert_eq!(
        (down.code, down.reason.as_str()),
        (503, "ServiceUnavailable"),
        "{down:?}"
    );
    let raw_down = Request::get("/openid/v1/jwks").send(kube.port()).expect("GET");
    assert_eq!(raw_down.status, 503);
    assert_eq!(kube.jwks_requests(), 2, "a refused request is not served");
    // The default client keeps retrying and gets through once the server is back.
    let secrets: Api<Secret> = Api::namespaced(c, "default");
    let pending = tokio::spawn(async move { secrets.get("any").await });
    let attempts = || {
        kube.requests()
            .iter()
            .filter(|(_, p)| p == "/api/v1/namespaces/default/secrets/any")
            .count()
    };
    eventually(Duration::from_secs(5), "the default client to retry the 503", || {
        attempts() >= 3
    })
    .await;
    kube.set_unavailable(false);
    let after = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("retry gets through")
        .unwrap();
    assert_eq!(api_error(after).code, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_reconciles_and_settles_on_its_own_status_writes() {
    use futures::StreamExt;
    use kube::runtime::controller::{Action, Controller};
    use kube::runtime::watcher;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Ctx {
        api: Api<DynamicObject>,
        reconciles: AtomicUsize,
    }
    let kube = KubeApi::start().expect("start");
    let ar = connector_resource();
    let api: Api<DynamicObject> = Api::namespaced_with(client(&kube), "ns1", &ar);
    let ctx = Arc::new(Ctx {
        api: api.clone(),
        reconciles: AtomicUsize::new(0),
    });
    let reconcile = |obj: Arc<DynamicObject>, ctx: Arc<Ctx>| async move {
        ctx.reconciles.fetch_add(1, Ordering::SeqCst);
        let name = obj.metadata.name.clone().unwrap_or_default();
        let status = json!({"status": {"observedGeneration": obj.metadata.generation, "phase": "Ready"}});
        ctx.api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok::<_, kube::Error>(Action::await_change())
    };
    let error_policy = |_: Arc<DynamicObject>, _: &kube::Error, _: Arc<Ctx>| Action::requeue(Duration::from_secs(1));
    let controller = Controller::new_with(api.clone(), watcher::Config::default(), ar.clone())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let driver = tokio::spawn(controller);

    let connector = |address: &str| {
        json!({"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
               "metadata": {"name": "c1", "namespace": "ns1"}, "spec": {"address": address}})
    };
    kube.apply(connector("a:1")).expect("apply");
    let observed = |kube: &KubeApi| {
        kube.get("connectors.alauda.io/v1alpha1", "Connector", "ns1", "c1")
            .and_then(|o| o["status"]["observedGeneration"].as_i64())
    };
    eventually(Duration::from_secs(5), "status.observedGeneration 1", || {
        observed(&kube) == Some(1)
    })
    .await;
    kube.apply(connector("b:2")).expect("spec change");
    eventually(Duration::from_secs(5), "status.observedGeneration 2", || {
        observed(&kube) == Some(2)
    })
    .await;
    // Its own status write triggers one more reconcile whose write is a no-op: it settles.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settled = ctx.reconciles.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        ctx.reconciles.load(Ordering::SeqCst),
        settled,
        "the controller keeps reconciling"
    );
    assert!((2..=6).contains(&settled), "{settled} reconciles for two generations");
    driver.abort();
}
