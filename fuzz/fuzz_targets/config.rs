//! The configuration validator: any bytes either compile or give a non-empty list of located
//! problems; never a panic.
#![no_main]
use connector_filter::config::compile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(errors) = compile(data, &|name| (name.len() % 2 == 0).then(|| "value".to_string())) {
        assert!(!errors.is_empty());
        assert!(errors.iter().all(|e| !e.path.is_empty() && !e.message.is_empty()));
    }
});
