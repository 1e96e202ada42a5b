//! The proxy-wasm ABI 0.2.1 host calls (module `env`), as Envoy answers them.
//!
//! Pointers and sizes are wasm32 `i32`s. A pointer out of the module's memory is a trap: it
//! is a bug in the module, and a test must see it.

use wasmtime::{Caller, Extern, Linker};
use wasmtime::{Result, bail, format_err};

use crate::status::{BAD_ARGUMENT, CAS_MISMATCH, EMPTY, NOT_FOUND, OK, SERIALIZATION_FAILURE};
use crate::{Headers, HttpCall, LocalResponse, Metric, State, Stream, buffer, deserialize_map, map, serialize_map};

type C<'a> = Caller<'a, State>;

/// Records the call; `Some(status)` when a fault is injected for it (see
/// [`crate::Record::inject`]): the host call then does nothing but return that status.
fn record(c: &mut C<'_>, name: &'static str) -> Option<i32> {
    let rec = &mut c.data_mut().rec;
    let eff = rec.effective;
    rec.calls.push((name, eff));
    rec.take_fault(name)
}

fn read(c: &mut C<'_>, ptr: i32, len: i32) -> Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mem = crate::memory(c)?;
    let mut buf = vec![0u8; len as u32 as usize];
    mem.read(&*c, ptr as u32 as usize, &mut buf)
        .map_err(|_| format_err!("read of {len} bytes at {ptr:#x} is out of the module's memory"))?;
    Ok(buf)
}

fn write(c: &mut C<'_>, ptr: i32, bytes: &[u8]) -> Result<()> {
    let mem = crate::memory(c)?;
    mem.write(&mut *c, ptr as u32 as usize, bytes).map_err(|_| {
        format_err!(
            "write of {} bytes at {ptr:#x} is out of the module's memory",
            bytes.len()
        )
    })
}

fn write_u32(c: &mut C<'_>, ptr: i32, v: u32) -> Result<()> {
    write(c, ptr, &v.to_le_bytes())
}

fn write_u64(c: &mut C<'_>, ptr: i32, v: u64) -> Result<()> {
    write(c, ptr, &v.to_le_bytes())
}

/// Allocates `bytes.len()` in the module (`proxy_on_memory_allocate`, else `malloc`) and copies
/// the bytes there; the module owns the memory afterwards.
fn alloc(c: &mut C<'_>, bytes: &[u8]) -> Result<i32> {
    let f = match c.get_export("proxy_on_memory_allocate") {
        Some(Extern::Func(f)) => f,
        _ => match c.get_export("malloc") {
            Some(Extern::Func(f)) => f,
            _ => bail!("the module exports neither proxy_on_memory_allocate nor malloc"),
        },
    };
    let f = f.typed::<i32, i32>(&*c)?;
    let ptr = f.call(&mut *c, bytes.len() as i32)?;
    if ptr == 0 && !bytes.is_empty() {
        bail!("the module could not allocate {} bytes", bytes.len());
    }
    write(c, ptr, bytes)?;
    Ok(ptr)
}

/// Returns `bytes` through the `(ptr, size)` out-parameters; empty bytes as a null pointer.
fn give(c: &mut C<'_>, bytes: &[u8], ret_ptr: i32, ret_size: i32) -> Result<()> {
    let ptr = if bytes.is_empty() { 0 } else { alloc(c, bytes)? };
    write_u32(c, ret_ptr, ptr as u32)?;
    write_u32(c, ret_size, bytes.len() as u32)
}

/// The header map `kind` of the effective context, if Envoy would lend it now.
fn map_of(state: &mut State, kind: i32) -> Option<&mut Headers> {
    let rec = &mut state.rec;
    if kind == map::HTTP_CALL_RESPONSE_HEADERS || kind == map::HTTP_CALL_RESPONSE_TRAILERS {
        let (h, _, t) = rec.call_response.as_mut()?;
        return Some(if kind == map::HTTP_CALL_RESPONSE_HEADERS { h } else { t });
    }
    let eff = rec.effective;
    let s: &mut Stream = rec.streams.get_mut(&eff)?;
    if s.done {
        return None;
    }
    match kind {
        // Request headers are gone once the response phase started (Envoy: the SDK's
        // getter then panics, which is what the filter must never provoke).
        map::REQUEST_HEADERS if !s.response_started => Some(&mut s.request_headers),
        map::REQUEST_TRAILERS if !s.response_started => Some(&mut s.request_trailers),
        map::RESPONSE_HEADERS if s.response_started => Some(&mut s.response_headers),
        map::RESPONSE_TRAILERS if s.response_started => Some(&mut s.response_trailers),
        _ => None,
    }
}

fn buffer_of(state: &mut State, kind: i32) -> Option<&mut Vec<u8>> {
    let rec = &mut state.rec;
    match kind {
        buffer::PLUGIN_CONFIGURATION => Some(&mut rec.plugin_configuration),
        buffer::VM_CONFIGURATION => Some(&mut rec.vm_configuration),
        buffer::HTTP_CALL_RESPONSE_BODY => rec.call_response.as_mut().map(|(_, b, _)| b),
        buffer::REQUEST_BODY | buffer::RESPONSE_BODY => {
            let eff = rec.effective;
            let s = rec.streams.get_mut(&eff)?;
            Some(if kind == buffer::REQUEST_BODY {
                &mut s.request_body
            } else {
                &mut s.response_body
            })
        }
        _ => None,
    }
}

fn name_matches(k: &[u8], name: &[u8]) -> bool {
    k.eq_ignore_ascii_case(name)
}

pub(crate) fn add_to_linker(l: &mut Linker<State>) -> Result<()> {
    // Logging and time.
    l.func_wrap(
        "env",
        "proxy_log",
        |mut c: C<'_>, level: i32, ptr: i32, len: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_log") {
                return Ok(status);
            }
            let msg = read(&mut c, ptr, len)?;
            c.data_mut()
                .rec
                .logs
                .push((level, String::from_utf8_lossy(&msg).into_owned()));
            Ok(OK)
        },
    )?;
    l.func_wrap("env", "proxy_get_log_level", |mut c: C<'_>, ret: i32| -> Result<i32> {
        if let Some(status) = record(&mut c, "proxy_get_log_level") {
            return Ok(status);
        }
        let level = c.data().rec.log_level;
        write_u32(&mut c, ret, level as u32)?;
        Ok(OK)
    })?;
    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ret: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_get_current_time_nanoseconds") {
                return Ok(status);
            }
            let now = c.data().rec.now_nanos();
            write_u64(&mut c, ret, now)?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, period: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_set_tick_period_milliseconds") {
                return Ok(status);
            }
            c.data_mut().rec.tick_period_ms = period as u32;
            Ok(OK)
        },
    )?;

    // Buffers.
    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, max: i32, ret_ptr: i32, ret_size: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_get_buffer_bytes") {
                return Ok(status);
            }
            let Some(buf) = buffer_of(c.data_mut(), kind) else {
                return Ok(NOT_FOUND);
            };
            let (start, max) = (start as u32 as usize, max as u32 as usize);
            let from = start.min(buf.len());
            let to = from.saturating_add(max).min(buf.len());
            let bytes = buf[from..to].to_vec();
            give(&mut c, &bytes, ret_ptr, ret_size)?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, size: i32, ptr: i32, len: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_set_buffer_bytes") {
                return Ok(status);
            }
            let data = read(&mut c, ptr, len)?;
            let Some(buf) = buffer_of(c.data_mut(), kind) else {
                return Ok(NOT_FOUND);
            };
            let from = (start as u32 as usize).min(buf.len());
            let to = from.saturating_add(size as u32 as usize).min(buf.len());
            buf.splice(from..to, data);
            Ok(OK)
        },
    )?;

    // Header maps.
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, kind: i32, ret_ptr: i32, ret_size: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_get_header_map_pairs") {
                return Ok(status);
            }
            let Some(m) = map_of(c.data_mut(), kind) else {
                return Ok(BAD_ARGUMENT);
            };
            let bytes = serialize_map(m);
            give(&mut c, &bytes, ret_ptr, ret_size)?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, kind: i32, ptr: i32, len: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_set_header_map_pairs") {
                return Ok(status);
            }
            let bytes = read(&mut c, ptr, len)?;
            let Some(new) = deserialize_map(&bytes) else {
                return Ok(SERIALIZATION_FAILURE);
            };
            let Some(m) = map_of(c.data_mut(), kind) else {
                return Ok(BAD_ARGUMENT);
            };
            *m = new;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C<'_>, kind: i32, kptr: i32, klen: i32, ret_ptr: i32, ret_size: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_get_header_map_value") {
                return Ok(status);
            }
            let key = read(&mut c, kptr, klen)?;
            let Some(m) = map_of(c.data_mut(), kind) else {
                return Ok(BAD_ARGUMENT);
            };
            // Envoy returns only the first of repeated values.
            let Some(v) = m.iter().find(|(k, _)| name_matches(k, &key)).map(|(_, v)| v.clone()) else {
                return Ok(NOT_FOUND);
            };
            give(&mut c, &v, ret_ptr, ret_size)?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: C<'_>, kind: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_replace_header_map_value") {
                return Ok(status);
            }
            let key = read(&mut c, kptr, klen)?;
            let value = read(&mut c, vptr, vlen)?;
            let Some(m) = map_of(c.data_mut(), kind) else {
                return Ok(BAD_ARGUMENT);
            };
            // Replace the first value, drop the others (Envoy's setCopy).
            let mut seen = false;
            m.retain_mut(|(k, v)| {
                if !name_matches(k, &key) {
                    return true;
                }
                if seen {
                    return false;
                }
                seen = true;
                *v = value.clone();
                true
            });
            if !seen {
                m.push((key.to_ascii_lowercase(), value));
            }
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: C<'_>, kind: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_add_header_map_value") {
                return Ok(status);
            }
            let key = read(&mut c, kptr, klen)?;
            let value = read(&mut c, vptr, vlen)?;
            let Some(m) = map_of(c.data_mut(), kind) else {
                return Ok(BAD_ARGUMENT);
            };
            m.push((key.to_ascii_lowercase(), value));
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, kind: i32, kptr: i32, klen: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_remove_header_map_value") {
                return Ok(status);
            }
            let key = read(&mut c, kptr, klen)?;
            let Some(m) = map_of(c.data_mut(), kind) else {
                return Ok(BAD_ARGUMENT);
            };
            m.retain(|(k, _)| !name_matches(k, &key));
            Ok(OK)
        },
    )?;

    // Stream control.
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         status: i32,
         dptr: i32,
         dlen: i32,
         bptr: i32,
         blen: i32,
         hptr: i32,
         hlen: i32,
         grpc_status: i32|
         -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_send_local_response") {
                return Ok(status);
            }
            let details = read(&mut c, dptr, dlen)?;
            let body = read(&mut c, bptr, blen)?;
            let h = read(&mut c, hptr, hlen)?;
            let Some(headers) = deserialize_map(&h) else {
                return Ok(SERIALIZATION_FAILURE);
            };
            let rec = &mut c.data_mut().rec;
            let eff = rec.effective;
            let Some(s) = rec.streams.get_mut(&eff) else {
                return Ok(BAD_ARGUMENT);
            };
            s.local_responses.push(LocalResponse {
                status: status as u32,
                details,
                headers,
                body,
                grpc_status,
            });
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: C<'_>, kind: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_continue_stream") {
                return Ok(status);
            }
            let rec = &mut c.data_mut().rec;
            let eff = rec.effective;
            let Some(s) = rec.streams.get_mut(&eff) else {
                return Ok(BAD_ARGUMENT);
            };
            match kind {
                0 => s.resumed_requests += 1,
                1 => s.resumed_responses += 1,
                _ => return Ok(BAD_ARGUMENT),
            }
            Ok(OK)
        },
    )?;
    l.func_wrap("env", "proxy_resume_http_request", |mut c: C<'_>| -> Result<i32> {
        if let Some(status) = record(&mut c, "proxy_resume_http_request") {
            return Ok(status);
        }
        let rec = &mut c.data_mut().rec;
        let eff = rec.effective;
        match rec.streams.get_mut(&eff) {
            Some(s) => {
                s.resumed_requests += 1;
                Ok(OK)
            }
            None => Ok(BAD_ARGUMENT),
        }
    })?;
    l.func_wrap("env", "proxy_close_stream", |mut c: C<'_>, _kind: i32| -> Result<i32> {
        if let Some(status) = record(&mut c, "proxy_close_stream") {
            return Ok(status);
        }
        let rec = &mut c.data_mut().rec;
        let eff = rec.effective;
        match rec.streams.get_mut(&eff) {
            Some(s) => {
                s.closed += 1;
                Ok(OK)
            }
            None => Ok(BAD_ARGUMENT),
        }
    })?;
    l.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: C<'_>, id: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_set_effective_context") {
                return Ok(status);
            }
            let rec = &mut c.data_mut().rec;
            let id = id as u32;
            let known =
                id == rec.root_id || rec.more_roots.contains(&id) || rec.streams.get(&id).is_some_and(|s| !s.done);
            if !known {
                return Ok(BAD_ARGUMENT);
            }
            rec.effective = id;
            Ok(OK)
        },
    )?;

    l.func_wrap("env", "proxy_done", |mut c: C<'_>| -> Result<i32> {
        if let Some(status) = record(&mut c, "proxy_done") {
            return Ok(status);
        }
        Ok(OK)
    })?;

    // Outgoing calls.
    l.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: C<'_>,
         uptr: i32,
         ulen: i32,
         hptr: i32,
         hlen: i32,
         bptr: i32,
         blen: i32,
         tptr: i32,
         tlen: i32,
         timeout: i32,
         ret_token: i32|
         -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_http_call") {
                return Ok(status);
            }
            let cluster = read(&mut c, uptr, ulen)?;
            let h = read(&mut c, hptr, hlen)?;
            let body = read(&mut c, bptr, blen)?;
            let t = read(&mut c, tptr, tlen)?;
            let (Some(headers), Some(trailers)) = (deserialize_map(&h), deserialize_map(&t)) else {
                return Ok(SERIALIZATION_FAILURE);
            };
            // Envoy refuses a call without :method, :path and :authority.
            let has = |n: &str| headers.iter().any(|(k, _)| k == n.as_bytes());
            if !(has(":method") && has(":path") && has(":authority")) {
                return Ok(BAD_ARGUMENT);
            }
            let rec = &mut c.data_mut().rec;
            rec.next_token += 1;
            let token = rec.next_token;
            rec.http_calls.push(HttpCall {
                token,
                context: rec.effective,
                cluster: String::from_utf8_lossy(&cluster).into_owned(),
                headers,
                body,
                trailers,
                timeout_ms: timeout as u32,
                answered: false,
            });
            write_u32(&mut c, ret_token, token)?;
            Ok(OK)
        },
    )?;

    // Metrics.
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, kind: i32, nptr: i32, nlen: i32, ret_id: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_define_metric") {
                return Ok(status);
            }
            let name = String::from_utf8_lossy(&read(&mut c, nptr, nlen)?).into_owned();
            if !(0..=2).contains(&kind) {
                return Ok(BAD_ARGUMENT);
            }
            let metrics = &mut c.data_mut().rec.metrics;
            let id = match metrics.iter().position(|m| m.name == name) {
                Some(i) => i,
                None => {
                    metrics.push(Metric { kind, name, value: 0 });
                    metrics.len() - 1
                }
            };
            write_u32(&mut c, ret_id, id as u32)?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_increment_metric",
        |mut c: C<'_>, id: i32, offset: i64| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_increment_metric") {
                return Ok(status);
            }
            let Some(m) = c.data_mut().rec.metrics.get_mut(id as u32 as usize) else {
                return Ok(NOT_FOUND);
            };
            if m.kind == 2 {
                return Ok(BAD_ARGUMENT);
            }
            m.value = m.value.wrapping_add_signed(offset);
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_record_metric",
        |mut c: C<'_>, id: i32, value: i64| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_record_metric") {
                return Ok(status);
            }
            let Some(m) = c.data_mut().rec.metrics.get_mut(id as u32 as usize) else {
                return Ok(NOT_FOUND);
            };
            m.value = value as u64;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: i32, ret: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_get_metric") {
                return Ok(status);
            }
            let Some(v) = c.data().rec.metrics.get(id as u32 as usize).map(|m| m.value) else {
                return Ok(NOT_FOUND);
            };
            write_u64(&mut c, ret, v)?;
            Ok(OK)
        },
    )?;

    // Properties.
    l.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, pptr: i32, plen: i32, vptr: i32, vlen: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_set_property") {
                return Ok(status);
            }
            let path = read(&mut c, pptr, plen)?;
            let value = read(&mut c, vptr, vlen)?;
            c.data_mut().rec.properties.insert(path, value);
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, pptr: i32, plen: i32, ret_ptr: i32, ret_size: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_get_property") {
                return Ok(status);
            }
            let path = read(&mut c, pptr, plen)?;
            let Some(v) = c.data().rec.properties.get(&path).cloned() else {
                return Ok(NOT_FOUND);
            };
            give(&mut c, &v, ret_ptr, ret_size)?;
            Ok(OK)
        },
    )?;

    // Shared data and queues (this host has one VM, so "shared" is per host).
    // Envoy's foreign functions: `verify_signature` only (what the filter calls), made with the
    // rsa crate as Envoy makes it with BoringSSL (PKCS#1 v1.5 over the named hash, the key as
    // DER SubjectPublicKeyInfo). Any other name is NotFound, as in Envoy.
    l.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: C<'_>, nptr: i32, nlen: i32, aptr: i32, alen: i32, ret_ptr: i32, ret_size: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_call_foreign_function") {
                return Ok(status);
            }
            let name = read(&mut c, nptr, nlen)?;
            if name != b"verify_signature" {
                return Ok(NOT_FOUND);
            }
            let args = read(&mut c, aptr, alen)?;
            let Some(answer) = crate::foreign::verify_signature(&args) else {
                return Ok(BAD_ARGUMENT);
            };
            give(&mut c, &answer, ret_ptr, ret_size)?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>, kptr: i32, klen: i32, ret_ptr: i32, ret_size: i32, ret_cas: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_get_shared_data") {
                return Ok(status);
            }
            let key = read(&mut c, kptr, klen)?;
            let Some((v, cas)) = c.data().rec.shared_data.get(&key).cloned() else {
                return Ok(NOT_FOUND);
            };
            give(&mut c, &v, ret_ptr, ret_size)?;
            write_u32(&mut c, ret_cas, cas)?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C<'_>, kptr: i32, klen: i32, vptr: i32, vlen: i32, cas: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_set_shared_data") {
                return Ok(status);
            }
            let key = read(&mut c, kptr, klen)?;
            let value = read(&mut c, vptr, vlen)?;
            let data = &mut c.data_mut().rec.shared_data;
            let current = data.get(&key).map(|(_, c)| *c);
            if cas != 0 && current.is_some_and(|cur| cur != cas as u32) {
                return Ok(CAS_MISMATCH);
            }
            data.insert(key, (value, current.unwrap_or(0) + 1));
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: C<'_>, nptr: i32, nlen: i32, ret_id: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_register_shared_queue") {
                return Ok(status);
            }
            let name = String::from_utf8_lossy(&read(&mut c, nptr, nlen)?).into_owned();
            let queues = &mut c.data_mut().rec.queues;
            let id = match queues.iter().position(|(vm, n, _)| vm.is_empty() && *n == name) {
                Some(i) => i,
                None => {
                    queues.push((String::new(), name, Vec::new()));
                    queues.len() - 1
                }
            };
            write_u32(&mut c, ret_id, id as u32)?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, vptr: i32, vlen: i32, nptr: i32, nlen: i32, ret_id: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_resolve_shared_queue") {
                return Ok(status);
            }
            let _vm = read(&mut c, vptr, vlen)?;
            let name = String::from_utf8_lossy(&read(&mut c, nptr, nlen)?).into_owned();
            let Some(id) = c.data().rec.queues.iter().position(|(_, n, _)| *n == name) else {
                return Ok(NOT_FOUND);
            };
            write_u32(&mut c, ret_id, id as u32)?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: C<'_>, id: i32, vptr: i32, vlen: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_enqueue_shared_queue") {
                return Ok(status);
            }
            let value = read(&mut c, vptr, vlen)?;
            let Some((_, _, q)) = c.data_mut().rec.queues.get_mut(id as u32 as usize) else {
                return Ok(NOT_FOUND);
            };
            q.push(value);
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: C<'_>, id: i32, ret_ptr: i32, ret_size: i32| -> Result<i32> {
            if let Some(status) = record(&mut c, "proxy_dequeue_shared_queue") {
                return Ok(status);
            }
            let Some((_, _, q)) = c.data_mut().rec.queues.get_mut(id as u32 as usize) else {
                return Ok(NOT_FOUND);
            };
            if q.is_empty() {
                return Ok(EMPTY);
            }
            let v = q.remove(0);
            give(&mut c, &v, ret_ptr, ret_size)?;
            Ok(OK)
        },
    )?;
    Ok(())
}
