#![no_main]

// The harness serves both request targets; each uses one entry point.
#[allow(dead_code)]
#[path = "../harness/request.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
