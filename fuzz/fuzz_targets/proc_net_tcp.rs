#![no_main]

#[path = "../harness/proc_net_tcp.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
