//! Weights from the Hugging Face Hub (`hf:<owner>/<repo>[@<revision>][/<file>]`),
//! end to end without the internet: a small HTTP server on 127.0.0.1
//! answers the Hub's file requests (`$HF_ENDPOINT`), the binary downloads
//! into a temporary `$HF_HOME`, and then works from the cache with the
//! server gone; `HF_HUB_OFFLINE=1` reads the cache only; a failed download
//! is one `error:` line with the hint.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[path = "support/scratch.rs"]
mod scratch;
use scratch::Scratch;

/// The commit every file of the fake Hub is at.
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A fake Hub serving `files` (`owner/repo/file` -> bytes) at any revision.
struct HubServer {
    endpoint: String,
    stop: Arc<AtomicBool>,
    paths: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl HubServer {
    fn start(files: HashMap<String, Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (stop, paths) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let (stop_flag, seen) = (Arc::clone(&stop), Arc::clone(&paths));
        let thread = std::thread::spawn(move || {
            // Bounded: the server ends with the test, or after two minutes.
            for _ in 0..12_000 {
                if stop_flag.load(Ordering::SeqCst) {
                    return;
                }
                match listener.accept() {
                    Ok((stream, _)) => answer(stream, &files, &seen),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self { endpoint, stop, paths, thread: Some(thread) }
    }

    /// Stops answering: the port then refuses connections.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One request: `GET /<owner>/<repo>/resolve/<revision>/<file>` with a
/// `Range: bytes=A-[B]` header, answered as the Hub answers it.
fn answer(stream: TcpStream, files: &HashMap<String, Vec<u8>>, seen: &Mutex<Vec<String>>) {
    stream.set_nonblocking(false).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request = String::new();
    reader.read_line(&mut request).unwrap();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line.trim().is_empty() {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
            let (a, b) = value.trim().split_once('-').unwrap();
            range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().ok()));
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
    seen.lock().unwrap().push(path.clone());
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let file = match parts.as_slice() {
        [owner, repo, "resolve", _revision, name] => files.get(&format!("{owner}/{repo}/{name}")),
        _ => None,
    };
    let mut stream = stream;
    let Some(bytes) = file else {
        let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let (start, end) = match range {
        Some((a, b)) => (a, b.map_or(bytes.len() - 1, |b| b.min(bytes.len() - 1))),
        None => (0, bytes.len() - 1),
    };
    let body = &bytes[start..=end];
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{}\r\n\
         ETag: \"etag-{}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        body.len(),
        bytes.len(),
        bytes.len()
    );
    let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body));
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/weights").join(name)
}

fn retinanet(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_retinanet"));
    cmd.args(args).env_remove("HF_HUB_OFFLINE").env_remove("HF_ENDPOINT").env_remove("HF_HOME");
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

fn assert_ok(o: &Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Exit code 1 and one `error:` line containing every needle.
fn assert_error(o: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(needles.iter().all(|n| errors[0].contains(n)), "{stderr}");
}

/// The config of make_weights.py's tiny RetinaNet v1 layout.
fn tiny_v1_config(dir: &Path) -> PathBuf {
    let path = dir.join("tiny_v1.toml");
    let text = "[data]\nclasses = [\"a\", \"b\", \"c\"]\ncategory_ids = [1, 2, 3]\n\
                [input]\nmin_size = [64]\nmax_size = 64\n[model]\nnum_classes = 3\n\
                [model.backbone]\ndepth = 50\nwidth = 2\nnorm = \"frozen_bn\"\n[model.fpn]\nchannels = 8\n";
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn hub_weights_download_cache_pin_and_fail_with_a_hint() {
    let weights = std::fs::read(fixture("retinanet_v1.pth")).unwrap();
    let files = HashMap::from([("owner/tiny/model.pth".to_string(), weights)]);
    let mut server = HubServer::start(files.clone());
    let dir = Scratch::folder("e2e");
    let (cached, empty) = (dir.join("cached"), dir.join("empty"));
    let (cached, empty) = (cached.to_str().unwrap(), empty.to_str().unwrap());
    let out = dir.join("out.safetensors");
    let convert = |spec: &str| ["convert-weights", spec, "--out", out.to_str().unwrap()].map(String::from);
    let args = convert("hf:owner/tiny/model.pth");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // Downloaded into the cache, then read from it with the server gone.
    assert_ok(&retinanet(&args, &[("HF_HOME", cached), ("HF_ENDPOINT", &server.endpoint)]));
    let first = std::fs::read(&out).unwrap();
    assert!(server.paths.lock().unwrap().iter().any(|p| p == "/owner/tiny/resolve/main/model.pth"));
    let endpoint = server.endpoint.clone();
    server.stop();
    std::fs::remove_file(&out).unwrap();
    assert_ok(&retinanet(&args, &[("HF_HOME", cached), ("HF_ENDPOINT", &endpoint)]));
    assert_eq!(std::fs::read(&out).unwrap(), first, "the cached file converts to the same tensors");

    // No server and an empty cache: one error line with the hint.
    assert_error(
        &retinanet(&args, &[("HF_HOME", empty), ("HF_ENDPOINT", &endpoint)]),
        &["hf:owner/tiny/model.pth", "cannot download", "HF_HOME", "local file"],
    );
    // Offline: the cache only, and it says so when the file is absent.
    assert_error(&retinanet(&args, &[("HF_HOME", empty), ("HF_HUB_OFFLINE", "1")]), &["HF_HUB_OFFLINE", "model.pth"]);
    assert_ok(&retinanet(&args, &[("HF_HOME", cached), ("HF_HUB_OFFLINE", "1")]));

    // predict (and eval, through the same resolver) take hf: weights.
    let config = tiny_v1_config(&dir);
    let image = dir.join("image.png");
    image::RgbImage::new(48, 64).save(&image).unwrap();
    let predict = [
        "predict",
        "--weights",
        "hf:owner/tiny/model.pth",
        "--config",
        config.to_str().unwrap(),
        "--json",
        image.to_str().unwrap(),
    ];
    let o = retinanet(&predict, &[("HF_HOME", cached), ("HF_HUB_OFFLINE", "1")]);
    assert_ok(&o);
    let results: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(results[0]["width"], 48);

    // A revision pin asks the server for that revision.
    let server = HubServer::start(files);
    let pinned = convert("hf:owner/tiny@v2/model.pth");
    let pinned: Vec<&str> = pinned.iter().map(String::as_str).collect();
    let home = dir.join("pinned");
    assert_ok(&retinanet(&pinned, &[("HF_HOME", home.to_str().unwrap()), ("HF_ENDPOINT", &server.endpoint)]));
    assert!(server.paths.lock().unwrap().iter().any(|p| p == "/owner/tiny/resolve/v2/model.pth"));
}

/// The finetune preset names ImageNet weights on the Hub: without the
/// network and an empty cache it stops with the hint, before any run folder.
#[test]
fn the_finetune_preset_without_weights_stops_with_the_hint() {
    let dir = Scratch::folder("finetune");
    let run = dir.join("run");
    let home = dir.join("home");
    let o = retinanet(
        &["train", "--config", "finetune", "--out", run.to_str().unwrap()],
        &[("HF_HOME", home.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")],
    );
    assert_error(&o, &["hf:timm/resnet50.tv_in1k", "HF_HUB_OFFLINE"]);
    assert!(!run.exists(), "no run folder");
}
