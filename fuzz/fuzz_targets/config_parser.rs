//! A config file, and each of its lines as a `--set KEY=VALUE` override on
//! the default preset: a config or an error naming the key, never a panic.
#![no_main]

use candle_retinanet::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::from_toml(text);
    let overrides: Vec<String> = text.lines().take(8).map(str::to_string).collect();
    let _ = Config::resolve(None, &overrides);
});
