#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| deploykit::fuzzing::query_template(data));
