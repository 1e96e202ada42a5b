//! A filter configuration cut into parts as the controller serves them (`--config-parts`,
//! issue 17), and the channel's answers to the module's part calls: shared by the
//! `config_parts` tests and the `push-cost` probe, so both deliver parts the way the
//! controller does.

use anyhow::{Result, bail};
use connector_core::channel::{part_id, part_path};
use serde_json::{Value, json};

use crate::Host;

/// Cuts `doc`'s `connectors` into runs of `sizes` entries, which must cover them all. `doc` then
/// lists the parts' ids and an empty `connectors`, as the controller's document does; gives
/// each part's (id, text): its entries joined with `,`.
pub fn cut(doc: &mut Value, sizes: &[usize]) -> Result<Vec<(String, String)>> {
    let entries = doc["connectors"].as_array().cloned().unwrap_or_default();
    if sizes.iter().sum::<usize>() != entries.len() {
        bail!("runs of {sizes:?} do not cover {} connectors", entries.len());
    }
    let mut parts = vec![];
    let mut rest = &entries[..];
    for n in sizes {
        let (run, tail) = rest.split_at(*n);
        let text = run.iter().map(Value::to_string).collect::<Vec<_>>().join(",");
        parts.push((part_id(text.as_bytes()), text));
        rest = tail;
    }
    doc["parts"] = parts.iter().map(|(id, _)| json!(id)).collect();
    doc["connectors"] = json!([]);
    Ok(parts)
}

/// Runs of `size` entries (the last one shorter) over `n` connectors.
pub fn runs_of(size: usize, n: usize) -> Vec<usize> {
    (0..n).step_by(size.max(1)).map(|i| size.min(n - i)).collect()
}

/// Answers every pending call to `cluster` with the text of the part its path names, as the
/// channel does; gives how many it answered. A path that names no part of `parts` is an error.
pub fn answer(h: &mut Host, cluster: &str, parts: &[(String, String)]) -> Result<usize> {
    let calls: Vec<_> = h.pending_calls().into_iter().filter(|c| c.cluster == cluster).collect();
    for c in &calls {
        let path = c.header(":path").unwrap_or_default();
        let Some((_, text)) = parts.iter().find(|(id, _)| path == part_path(id)) else {
            bail!("asked for {path}, not a part of the document");
        };
        h.answer_call(c.token, 200, &[("content-type", "application/json")], text.as_bytes())?;
    }
    Ok(calls.len())
}
