//! Every proxy-wasm host call the filter makes, with every status the host can return handled.
//!
//! Why not the SDK's calls: proxy-wasm 0.2.5's `hostcalls` functions `panic!` on any status
//! they did not expect, and its trait methods `unwrap` their `Result`. A failed HTTP call
//! reaches `on_http_call_response` with no response headers, and reading one then returns
//! `BadArgument`: inside the SDK that is a panic, the VM traps, and with `FAIL_CLOSED` every
//! later request on that worker, for every connector, gets a bare 503 (envoyproxy/envoy#26485).
//! Here a status is a value: reads answer `None`/`Err`, writes report failure, nothing traps.
//!
//! The one SDK call left is [`dispatch_http_call`]: the SDK must record which context a call
//! belongs to, or its dispatcher traps ("invalid token_id") when the answer arrives, and that
//! bookkeeping is private to the SDK. Its panicking arm cannot be reached from Envoy: Envoy's
//! `httpCall` returns only `Ok`, `BadArgument` (unknown cluster, missing pseudo-header) and
//! `InternalFailure` (the request could not start), which the SDK turns into `Err`.
//!
//! Memory the host returns was allocated through the SDK's `proxy_on_memory_allocate` export
//! (`Vec::with_capacity(size)`), so it is taken back with `Vec::from_raw_parts(ptr, size, size)`,
//! exactly as the SDK does.

#![allow(unsafe_code)]

use std::ptr::{null, null_mut};
use std::time::Duration;

use crate::wire;

/// A status the host returned other than `Ok` (0); the number is the ABI's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u32);

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;

/// The header maps (ABI numbering): the request's, the response's, an HTTP call's answer.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum Map {
    Request = 0,
    RequestTrailers = 1,
    Response = 2,
    ResponseTrailers = 3,
    CallResponse = 6,
}

/// The buffers (ABI numbering).
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum Buffer {
    ResponseBody = 1,
    CallResponseBody = 4,
    PluginConfiguration = 7,
}

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_log(level: u32, data: *const u8, size: usize) -> u32;
    fn proxy_get_log_level(ret: *mut u32) -> u32;
    fn proxy_get_current_time_nanoseconds(ret: *mut u64) -> u32;
    fn proxy_get_header_map_pairs(map: u32, ret_data: *mut *mut u8, ret_size: *mut usize) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_get_buffer_bytes(
        buffer: u32,
        start: usize,
        max_size: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(buffer: u32, start: usize, size: usize, data: *const u8, data_size: usize) -> u32;
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_set_tick_period_milliseconds(millis: u32) -> u32;
    fn proxy_set_property(path: *const u8, path_size: usize, value: *const u8, value_size: usize) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
        ret_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(key: *const u8, key_size: usize, value: *const u8, value_size: usize, cas: u32) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, ret_id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_call_foreign_function(
        name: *const u8,
        name_size: usize,
        arguments: *const u8,
        arguments_size: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
}

fn check(status: u32) -> Result<(), Status> {
    if status == OK { Ok(()) } else { Err(Status(status)) }
}

/// Takes ownership of bytes the host allocated in this module for a return value.
fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        return Vec::new();
    }
    // SAFETY: the host allocated `size` bytes at `data` through `proxy_on_memory_allocate`
    // (a `Vec` of that capacity, forgotten); this is its only owner from here on.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// Writes a log line; a host that refuses it loses the line, nothing else.
pub fn log(level: proxy_wasm::types::LogLevel, message: &str) {
    // SAFETY: pointer and length of a live `&str`.
    let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

/// Envoy's log level for wasm, or `None` if the host does not say.
pub fn log_level() -> Option<u32> {
    let mut level = 0u32;
    // SAFETY: `level` is a valid out-pointer for the call's duration.
    check(unsafe { proxy_get_log_level(&mut level) }).ok()?;
    Some(level)
}

/// Milliseconds since the Unix epoch by the host's clock. A request must not be decided without
/// it: taken as 0, a cached token or access decision would look valid forever.
pub fn now_millis() -> Result<u64, Status> {
    let mut nanos = 0u64;
    // SAFETY: `nanos` is a valid out-pointer for the call's duration.
    check(unsafe { proxy_get_current_time_nanoseconds(&mut nanos) })?;
    Ok(nanos / 1_000_000)
}

/// The clock where a failed read only shortens what is stored (an entry stored at 0 is
/// already expired when next checked) or delays a tick's work: never where a request is
/// decided.
pub fn now_millis_or_zero() -> u64 {
    now_millis().unwrap_or(0)
}

/// Calls the root context's `on_tick` every `millis` (0: never). Made on the root context.
pub fn set_tick_period(millis: u32) -> Result<(), Status> {
    // SAFETY: plain value argument.
    check(unsafe { proxy_set_tick_period_milliseconds(millis) })
}

/// Every entry of a header map. `Err` when the host has no such map now: a failed HTTP call
/// has no response headers, and the request headers are gone in the response phase.
pub fn headers(map: Map) -> Result<wire::HeaderMap, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: valid out-pointers for the call's duration.
    check(unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) })?;
    let bytes = take(data, size);
    // A map that does not parse is no map: the caller treats it like a missing one.
    wire::HeaderMap::parse(bytes).ok_or(Status(u32::MAX))
}

/// Sets (replaces) or, with `None`, removes a header.
pub fn set_header(map: Map, name: &str, value: Option<&str>) -> Result<(), Status> {
    // SAFETY: `name` and `value` are live for the call.
    let status = unsafe {
        match value {
            Some(v) => proxy_replace_header_map_value(map as u32, name.as_ptr(), name.len(), v.as_ptr(), v.len()),
            None => proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()),
        }
    };
    check(status)
}

/// Up to `max` bytes of a buffer from its start; `Ok(empty)` when the buffer is empty.
pub fn buffer(kind: Buffer, max: usize) -> Result<Vec<u8>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: valid out-pointers for the call's duration.
    let status = unsafe { proxy_get_buffer_bytes(kind as u32, 0, max, &mut data, &mut size) };
    match status {
        OK => Ok(take(data, size)),
        NOT_FOUND => Ok(Vec::new()),
        other => Err(Status(other)),
    }
}

/// The value of a shared data key (one store per `vm_id` and process); `None` when there is
/// none or the host does not answer.
pub fn shared_data(key: &str) -> Option<Vec<u8>> {
    let (mut data, mut size, mut cas) = (null_mut(), 0usize, 0u32);
    // SAFETY: `key` is live for the call; valid out-pointers.
    let status = unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    (status == OK).then(|| take(data, size))
}

/// Sets a shared data key, whatever its value was (no compare-and-swap).
pub fn set_shared_data(key: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: `key` and `value` are live for the call.
    check(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), 0) })
}

/// Replaces the first `size` bytes of a buffer (all of what is buffered) with `data`.
pub fn replace_buffer(kind: Buffer, size: usize, data: &[u8]) -> Result<(), Status> {
    // SAFETY: `data` is live for the call.
    check(unsafe { proxy_set_buffer_bytes(kind as u32, 0, size, data.as_ptr(), data.len()) })
}

/// Answers the effective context's request locally.
pub fn send_response(status: u32, headers: &[(&str, &str)], body: &[u8]) -> Result<(), Status> {
    let pairs: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    let map = wire::serialize_map(&pairs);
    // SAFETY: `body` and `map` are live for the call; no details string (null, 0).
    check(unsafe {
        proxy_send_local_response(
            status,
            null(),
            0,
            body.as_ptr(),
            body.len(),
            map.as_ptr(),
            map.len(),
            -1,
        )
    })
}

/// Lets the effective context's paused request go on upstream.
pub fn resume_request() -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_continue_stream(0) })
}

/// Makes `id` the context later calls act on; `Err` when that request has gone away.
pub fn set_effective_context(id: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_set_effective_context(id) })
}

/// Sets a top-level stream property (the access log reads them). The ABI separates a path's
/// segments with NUL: a path of one segment is its name as it is, with nothing to build.
pub fn set_property(name: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: `name` and `value` are live for the call.
    check(unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// Defines a counter; its id.
pub fn define_counter(name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    // SAFETY: `name` is live; `id` is a valid out-pointer.
    check(unsafe { proxy_define_metric(0, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment(id: u32, by: i64) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_increment_metric(id, by) })
}

/// Calls the host's foreign function `name` (Envoy: `verify_signature`, ...) with `arguments`;
/// its answer's bytes. `Err(Status(1))` (NotFound): the host has no such function.
pub fn call_foreign(name: &str, arguments: &[u8]) -> Result<Vec<u8>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: name and arguments are live for the call; the host writes the answer's pointer
    // and size (memory it allocated in this module, taken back by `take`).
    let status = unsafe {
        proxy_call_foreign_function(
            name.as_ptr(),
            name.len(),
            arguments.as_ptr(),
            arguments.len(),
            &mut data,
            &mut size,
        )
    };
    check(status)?;
    Ok(take(data, size))
}

/// Sends an HTTP call to `cluster` on behalf of the SDK's current context. The SDK keeps the
/// token → context record (see the module comment for why this one call stays the SDK's).
pub fn dispatch_http_call(cluster: &str, headers: Vec<(&str, &str)>, timeout: Duration) -> Result<u32, Status> {
    proxy_wasm::hostcalls::dispatch_http_call(cluster, headers, None, vec![], timeout).map_err(|s| Status(s as u32))
}
