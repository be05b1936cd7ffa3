//! The ranks' rendezvous with each rank in its own process on 127.0.0.1, as
//! torchrun or srun start them on several machines. NCCL needs GPUs; the
//! meeting before it does not, so each rank here hands out a stand-in
//! group id (rank 0's process id) and prints what it got.
//!
//! This test has its own `main` (`harness = false` in Cargo.toml): it runs
//! each case, starting copies of itself as the ranks with `ROLE_ENV` set.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_retinanet::train::{meet, Place, RENDEZVOUS_TIMEOUT_ENV};

/// Set in a rank's environment: this process is a rank, not the test.
const ROLE_ENV: &str = "RENDEZVOUS_TEST_RANK";
/// The config a rank presents (the resolved config's TOML in `train`).
const CONFIG_ENV: &str = "RENDEZVOUS_TEST_CONFIG";
const CONFIG: &str = "name = \"shapes\"\n[train]\nlr = 0.02\n";
/// Every variable `Place` reads, cleared from a rank's environment first.
const PLACE_VARS: [&str; 10] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    RENDEZVOUS_TIMEOUT_ENV,
    CONFIG_ENV,
];

fn main() {
    if std::env::var_os(ROLE_ENV).is_some() {
        be_a_rank();
    }
    let cases: [(&str, fn()); 7] = [
        ("three ranks started in any order get rank 0's id", three_ranks_get_rank_0s_id),
        ("srun's variables", slurm_ranks_meet),
        ("a rank that never arrives is named on every rank", a_missing_rank_is_named),
        ("a rank without rank 0 gives up at the timeout", no_rank_0),
        ("ranks with different configs stop", different_configs_stop),
        ("the same rank twice stops", a_rank_twice_stops),
        ("a stranger on the port is ignored", a_stranger_is_ignored),
    ];
    for (name, case) in cases {
        let start = Instant::now();
        case();
        println!("rendezvous: {name} ... ok ({:.1} s)", start.elapsed().as_secs_f64());
    }
}

/// The rank's side: meet, print `id <id>` or the error, exit.
fn be_a_rank() -> ! {
    let config = std::env::var(CONFIG_ENV).unwrap_or_else(|_| CONFIG.into());
    let outcome = Place::from_env().and_then(|place| {
        let place = place.expect("a rank's environment");
        meet(&place, &config, || Ok(format!("rank-0-of-pid-{}", std::process::id())))
    });
    match outcome {
        Ok(id) => {
            println!("id {id}");
            std::process::exit(0)
        }
        Err(err) => {
            println!("error: {err:#}");
            std::process::exit(1)
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts a rank with `vars` (its place) added to a clean environment.
fn start(vars: &[(&str, String)]) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    for name in PLACE_VARS {
        command.env_remove(name);
    }
    command.env(ROLE_ENV, "1").envs(vars.iter().map(|(n, v)| (*n, v.as_str())));
    command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap()
}

/// torchrun's variables for `rank` of `world`, meeting on `port`.
fn torchrun(rank: usize, world: usize, port: u16, timeout_s: u64) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", world.to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
        (RENDEZVOUS_TIMEOUT_ENV, timeout_s.to_string()),
    ]
}

/// What a rank printed, and whether it succeeded.
fn finish(child: Child) -> (bool, String) {
    let Output { status, stdout, .. } = child.wait_with_output().unwrap();
    (status.success(), String::from_utf8(stdout).unwrap().trim().to_string())
}

fn three_ranks_get_rank_0s_id() {
    let port = free_port();
    // The others start first and retry until rank 0 listens.
    let mut ranks = vec![start(&torchrun(2, 3, port, 20)), start(&torchrun(1, 3, port, 20))];
    std::thread::sleep(Duration::from_millis(500));
    let rank_0 = start(&torchrun(0, 3, port, 20));
    let expected = format!("id rank-0-of-pid-{}", rank_0.id());
    ranks.push(rank_0);
    for rank in ranks {
        assert_eq!(finish(rank), (true, expected.clone()));
    }
}

fn slurm_ranks_meet() {
    let port = free_port();
    let slurm = |rank: usize| {
        vec![
            ("SLURM_PROCID", rank.to_string()),
            ("SLURM_NTASKS", "2".into()),
            ("SLURM_LOCALID", "0".into()),
            ("MASTER_ADDR", "localhost".into()),
            ("MASTER_PORT", port.to_string()),
        ]
    };
    let rank_0 = start(&slurm(0));
    let expected = format!("id rank-0-of-pid-{}", rank_0.id());
    let rank_1 = start(&slurm(1));
    assert_eq!(finish(rank_0), (true, expected.clone()));
    assert_eq!(finish(rank_1), (true, expected));
}

fn a_missing_rank_is_named() {
    let port = free_port();
    let rank_0 = start(&torchrun(0, 3, port, 2));
    let rank_1 = start(&torchrun(1, 3, port, 2));
    let why = format!("rendezvous at 127.0.0.1:{port}: rank(s) 2 of 3 did not arrive within 2 s");
    let (ok, printed) = finish(rank_0);
    assert!(
        !ok && printed == format!("error: {why}; was every rank started, with the same MASTER_ADDR and MASTER_PORT?")
    );
    let (ok, printed) = finish(rank_1);
    assert!(!ok && printed.starts_with(&format!("error: rank 1: rank 0 stopped the run: {why}")), "{printed}");
}

fn no_rank_0() {
    let port = free_port();
    let started = Instant::now();
    let (ok, printed) = finish(start(&torchrun(1, 2, port, 1)));
    assert!(!ok && printed.starts_with(&format!("error: rank 1: cannot reach rank 0 at 127.0.0.1:{port} within 1 s")));
    assert!(printed.contains("Connection refused"), "{printed}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

fn different_configs_stop() {
    let port = free_port();
    let rank_0 = start(&torchrun(0, 2, port, 20));
    let mut other = torchrun(1, 2, port, 20);
    other.push((CONFIG_ENV, CONFIG.replace("0.02", "0.04")));
    let rank_1 = start(&other);
    let why = "rank 1 (127.0.0.1:";
    let (ok, printed) = finish(rank_0);
    assert!(
        !ok && printed.contains(why)
            && printed.contains("has a different config: `lr = 0.04` where rank 0 has `lr = 0.02`")
    );
    let (ok, printed) = finish(rank_1);
    assert!(!ok && printed.starts_with("error: rank 1: rank 0 stopped the run:") && printed.contains("`lr = 0.04`"));
}

fn a_rank_twice_stops() {
    let port = free_port();
    let rank_0 = start(&torchrun(0, 3, port, 20));
    let first = start(&torchrun(1, 3, port, 20));
    let second = start(&torchrun(1, 3, port, 20));
    let (ok, printed) = finish(rank_0);
    assert!(!ok && printed.contains("rank 1 arrived twice"), "{printed}");
    for rank in [first, second] {
        let (ok, printed) = finish(rank);
        assert!(!ok && printed.starts_with("error: rank 1: rank 0 stopped the run:"), "{printed}");
    }
}

fn a_stranger_is_ignored() {
    let port = free_port();
    let rank_0 = start(&torchrun(0, 2, port, 20));
    let deadline = Instant::now() + Duration::from_secs(10);
    let stranger = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(err) => panic!("rank 0 does not listen: {err}"),
        }
    };
    std::io::Write::write_all(&mut &stranger, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let expected = format!("id rank-0-of-pid-{}", rank_0.id());
    let rank_1 = start(&torchrun(1, 2, port, 20));
    assert_eq!(finish(rank_0), (true, expected.clone()));
    assert_eq!(finish(rank_1), (true, expected));
}
