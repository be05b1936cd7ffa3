//! An image file's bytes (JPEG, PNG or anything else): an upright RGB image
//! or an error, never a panic.
#![no_main]

use candle_retinanet::data::decode_rgb;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_rgb(data);
});
