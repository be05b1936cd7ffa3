//! How the ranks of a data-parallel run find each other before NCCL joins
//! them: rank 0 makes the group's id and hands it to every other rank over
//! TCP, as torch.distributed's `env://` rendezvous does with its TCPStore.
//!
//! A rank learns its place from the variables its launcher sets:
//! - torchrun, and `retinanet train --gpus` on one machine: `RANK`,
//!   `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` (plus one when
//!   torchrun's agent holds that port itself);
//! - SLURM's `srun`: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, with
//!   `MASTER_ADDR` and `MASTER_PORT` exported by the job script.
//!
//! The exchange is one JSON line each way:
//! - rank k -> rank 0: `{"protocol", "version", "rank", "world", "config"}`;
//! - rank 0 -> rank k, once every rank has arrived: `{"id": hex}`, or
//!   `{"error": why}` when the ranks disagree or one never arrived, so that
//!   every rank stops with the same reason instead of waiting in NCCL.
//!
//! Written over `std::net` by hand: the crates that offer a rendezvous come
//! with an async runtime or an MPI installation, for two messages.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::Shard;

/// How long a rank waits for the others when `RENDEZVOUS_TIMEOUT_ENV` is not
/// set (torchrun's join timeout is also 600 s).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Seconds to wait for every rank to arrive.
pub const RENDEZVOUS_TIMEOUT_ENV: &str = "RETINANET_RENDEZVOUS_TIMEOUT";

/// Names the exchange, so that rank 0 ignores connections from other programs.
const PROTOCOL: &str = "candle-retinanet-rendezvous/1";
/// A hello carries the config, a few KiB; anything longer is not a rank.
const MAX_LINE_BYTES: u64 = 1 << 20;
/// A rank sends its hello as soon as it connects; a silent connection is
/// dropped after this long.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Where rank 0 listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Master {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// This process's place in a run of several processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// Rank among all processes of all machines, and their number.
    pub shard: Shard,
    /// Rank among the processes of this machine: which of its GPUs to use.
    pub local_rank: usize,
    pub master: Master,
    /// How long to wait for every rank to arrive.
    pub timeout: Duration,
}

impl Place {
    /// This process's place from its environment; `None` when no launcher
    /// started it as a rank (`SLURM_NTASKS=1` is a plain single-process job).
    pub fn from_env() -> Result<Option<Place>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// As `from_env`, reading the variables through `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Place>> {
        let [rank, world, local] = if var("RANK").is_some() || var("WORLD_SIZE").is_some() {
            ["RANK", "WORLD_SIZE", "LOCAL_RANK"]
        } else if var("SLURM_PROCID").is_some() && number(&var, "SLURM_NTASKS")? > 1 {
            ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"]
        } else {
            return Ok(None);
        };
        let shard = Shard { rank: number(&var, rank)?, world: number(&var, world)? };
        if shard.world == 0 || shard.rank >= shard.world {
            bail!("environment variable {rank}: rank {} of a world of {} ({world})", shard.rank, shard.world);
        }
        let host = required(&var, "MASTER_ADDR", world)?;
        let port = required(&var, "MASTER_PORT", world)?;
        let port: u16 =
            port.parse().map_err(|_| anyhow::anyhow!("environment variable MASTER_PORT: `{port}` is not a port"))?;
        // torchrun's own agent listens on MASTER_PORT when it says so (the
        // TCPStore torch's ranks share), so rank 0 listens on the next port.
        let port = match var("TORCHELASTIC_USE_AGENT_STORE").as_deref() {
            Some("True") => {
                port.checked_add(1).context("MASTER_PORT: torchrun's agent holds 65535; choose a lower port")?
            }
            _ => port,
        };
        let timeout = match var(RENDEZVOUS_TIMEOUT_ENV) {
            None => DEFAULT_TIMEOUT,
            Some(_) => Duration::from_secs(number(&var, RENDEZVOUS_TIMEOUT_ENV)? as u64),
        };
        Ok(Some(Place { shard, local_rank: number(&var, local)?, master: Master { host, port }, timeout }))
    }

    /// The variables that make a process rank `rank` of `world` on this
    /// machine (torchrun's, as `from_env` reads them).
    pub fn local_vars(rank: usize, world: usize, master: &Master) -> [(&'static str, String); 6] {
        [
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", world.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("LOCAL_WORLD_SIZE", world.to_string()),
            ("MASTER_ADDR", master.host.clone()),
            ("MASTER_PORT", master.port.to_string()),
        ]
    }
}

fn number(var: &impl Fn(&str) -> Option<String>, name: &str) -> Result<usize> {
    let value = var(name).with_context(|| format!("environment variable {name} is not set"))?;
    value.trim().parse().map_err(|_| anyhow::anyhow!("environment variable {name}: `{value}` is not a number"))
}

fn required(var: &impl Fn(&str) -> Option<String>, name: &str, world: &str) -> Result<String> {
    var(name).filter(|v| !v.is_empty()).with_context(|| {
        format!("{world} is set, but {name} is not: a run of several processes needs {name} (rank 0's host and port)")
    })
}

#[derive(Serialize, Deserialize)]
struct Hello {
    protocol: String,
    version: String,
    rank: usize,
    world: usize,
    config: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Reply {
    Id(String),
    Error(String),
}

/// Meets the other ranks and returns the group id that rank 0 made with
/// `make_id`. Every rank must pass the same `config` (the resolved config as
/// TOML): ranks started with different `--set`s would train different
/// models. Fails on every rank when the ranks disagree or one does not
/// arrive within `place.timeout`.
pub fn meet(place: &Place, config: &str, make_id: impl FnOnce() -> Result<String>) -> Result<String> {
    let deadline = Instant::now() + place.timeout;
    match place.shard.rank {
        0 => lead(place, config, make_id, deadline),
        _ => follow(place, config, deadline),
    }
}

/// Rank 0: waits for every other rank's hello, then answers them all.
fn lead(place: &Place, config: &str, make_id: impl FnOnce() -> Result<String>, deadline: Instant) -> Result<String> {
    let listener = TcpListener::bind(("0.0.0.0", place.master.port))
        .with_context(|| format!("rank 0 cannot listen on port {} (MASTER_PORT)", place.master.port))?;
    listener.set_nonblocking(true)?;
    let mut arrived: Vec<Option<TcpStream>> = (0..place.shard.world).map(|_| None).collect();
    let gathered = gather(&listener, place, config, &mut arrived, deadline);
    let reply = match gathered.and_then(|()| make_id()) {
        Ok(id) => Reply::Id(id),
        Err(err) => Reply::Error(format!("{err:#}")),
    };
    for (rank, stream) in arrived.iter_mut().enumerate() {
        if let Some(stream) = stream {
            let sent = send(stream, &reply);
            if let (Err(err), Reply::Id(_)) = (sent, &reply) {
                bail!("rendezvous at {}: rank {rank} left before it got the group id: {err}", place.master);
            }
        }
    }
    match reply {
        Reply::Id(id) => Ok(id),
        Reply::Error(why) => bail!("{why}"),
    }
}

/// Accepts connections until every rank but 0 has said hello.
fn gather(
    listener: &TcpListener,
    place: &Place,
    config: &str,
    arrived: &mut [Option<TcpStream>],
    deadline: Instant,
) -> Result<()> {
    let mut waiting = place.shard.world - 1;
    while waiting > 0 {
        match listener.accept() {
            Ok((stream, peer)) => {
                let Some((hello, mut stream)) = read_hello(stream, deadline) else { continue };
                if let Err(err) = admit(&hello, peer, place, config, arrived) {
                    let _ = send(&mut stream, &Reply::Error(format!("{err:#}")));
                    return Err(err);
                }
                arrived[hello.rank] = Some(stream);
                waiting -= 1;
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> =
                        (1..arrived.len()).filter(|&r| arrived[r].is_none()).map(|r| r.to_string()).collect();
                    bail!(
                        "rendezvous at {}: rank(s) {} of {} did not arrive within {} s; \
                         was every rank started, with the same MASTER_ADDR and MASTER_PORT?",
                        place.master,
                        missing.join(", "),
                        place.shard.world,
                        place.timeout.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => return Err(err).context(format!("rendezvous at {}", place.master)),
        }
    }
    Ok(())
}

/// A rank's hello, or `None` for a connection that is not a rank of this
/// program (a port scanner, a health check).
fn read_hello(stream: TcpStream, deadline: Instant) -> Option<(Hello, TcpStream)> {
    stream.set_nonblocking(false).ok()?;
    let wait = deadline.saturating_duration_since(Instant::now()).min(HELLO_TIMEOUT);
    stream.set_read_timeout(Some(wait.max(Duration::from_millis(100)))).ok()?;
    let line = read_line(&stream).ok()?;
    let hello: Hello = serde_json::from_str(&line).ok()?;
    (hello.protocol == PROTOCOL).then_some((hello, stream))
}

/// Checks a hello against rank 0's own view of the run.
fn admit(hello: &Hello, peer: SocketAddr, place: &Place, config: &str, arrived: &[Option<TcpStream>]) -> Result<()> {
    let at = &place.master;
    let version = env!("CARGO_PKG_VERSION");
    if hello.version != version {
        bail!(
            "rendezvous at {at}: rank {} ({peer}) runs candle-retinanet {}, rank 0 runs {version}",
            hello.rank,
            hello.version
        );
    }
    if hello.world != place.shard.world {
        bail!(
            "rendezvous at {at}: rank {} ({peer}) counts a world of {}, rank 0 a world of {}",
            hello.rank,
            hello.world,
            place.shard.world
        );
    }
    if hello.rank == 0 || hello.rank >= place.shard.world {
        bail!("rendezvous at {at}: {peer} calls itself rank {} in a world of {}", hello.rank, place.shard.world);
    }
    if let Some(first) = &arrived[hello.rank] {
        let first = first.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
        bail!("rendezvous at {at}: rank {} arrived twice (from {first} and {peer})", hello.rank);
    }
    if let Some((theirs, ours)) = first_difference(&hello.config, config) {
        bail!(
            "rendezvous at {at}: rank {} ({peer}) has a different config: `{theirs}` where rank 0 has `{ours}`; \
             start every rank with the same --config and --set",
            hello.rank
        );
    }
    Ok(())
}

/// The first line where two configs differ, if they do.
fn first_difference<'a>(theirs: &'a str, ours: &'a str) -> Option<(&'a str, &'a str)> {
    let (mut a, mut b) = (theirs.lines(), ours.lines());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return None,
            (x, y) if x != y => return Some((x.unwrap_or("(end)"), y.unwrap_or("(end)"))),
            _ => {}
        }
    }
}

/// Rank k: connects to rank 0 (retrying until it listens), says hello and
/// waits for the id.
fn follow(place: &Place, config: &str, deadline: Instant) -> Result<String> {
    let rank = place.shard.rank;
    let mut stream = connect(place, deadline)?;
    let hello = Hello {
        protocol: PROTOCOL.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        rank,
        world: place.shard.world,
        config: config.into(),
    };
    write_line(&mut stream, &serde_json::to_string(&hello)?)
        .with_context(|| format!("rank {rank}: rank 0 at {} closed the connection", place.master))?;
    // Rank 0 answers once the last rank arrives, or says why none will.
    let wait = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
    stream.set_read_timeout(Some(wait))?;
    let line = read_line(&stream).with_context(|| {
        format!("rank {rank}: no answer from rank 0 at {} within {} s", place.master, place.timeout.as_secs())
    })?;
    if line.is_empty() {
        bail!("rank {rank}: rank 0 at {} ended the rendezvous without an answer (see its log)", place.master);
    }
    match serde_json::from_str(&line)
        .with_context(|| format!("rank {rank}: rank 0 at {} answered `{line}`", place.master))?
    {
        Reply::Id(id) => Ok(id),
        Reply::Error(why) => bail!("rank {rank}: rank 0 stopped the run: {why}"),
    }
}

/// A connection to rank 0, retried until `deadline` (rank 0 may start
/// later than this rank, on another machine).
fn connect(place: &Place, deadline: Instant) -> Result<TcpStream> {
    let master = &place.master;
    let mut last_error = String::new();
    loop {
        match (master.host.as_str(), master.port).to_socket_addrs() {
            Ok(addrs) => {
                for addr in addrs {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                        Ok(stream) => return Ok(stream),
                        Err(err) => last_error = format!("{addr}: {err}"),
                    }
                }
            }
            Err(err) => last_error = format!("cannot resolve {}: {err}", master.host),
        }
        if Instant::now() >= deadline {
            bail!(
                "rank {}: cannot reach rank 0 at {master} within {} s ({last_error}); \
                 is MASTER_ADDR rank 0's host, and was rank 0 started?",
                place.shard.rank,
                place.timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn send(stream: &mut TcpStream, reply: &Reply) -> std::io::Result<()> {
    write_line(stream, &serde_json::to_string(reply).map_err(std::io::Error::other)?)
}

fn write_line(stream: &mut TcpStream, line: &str) -> std::io::Result<()> {
    stream.write_all(line.as_bytes())?;
    stream.write_all(b"\n")?;
    stream.flush()
}

/// One line, without its newline; empty when the other side closed first.
fn read_line(stream: &TcpStream) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(stream.take(MAX_LINE_BYTES)).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(vars: &[(&str, &str)]) -> Result<Option<Place>> {
        Place::from_vars(|name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string()))
    }

    const MASTER: [(&str, &str); 2] = [("MASTER_ADDR", "node1"), ("MASTER_PORT", "29500")];

    #[test]
    fn torchrun_variables() {
        let vars = [MASTER.as_slice(), &[("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")]].concat();
        let place = place(&vars).unwrap().unwrap();
        assert_eq!(place.shard, Shard { rank: 5, world: 8 });
        assert_eq!(place.local_rank, 1);
        assert_eq!(place.master, Master { host: "node1".into(), port: 29500 });
        assert_eq!(place.timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn the_local_launchers_variables_read_back() {
        let master = Master { host: "127.0.0.1".into(), port: 4000 };
        let vars = Place::local_vars(2, 3, &master);
        let place = place(&vars.iter().map(|(n, v)| (*n, v.as_str())).collect::<Vec<_>>()).unwrap().unwrap();
        assert_eq!((place.shard, place.local_rank, place.master), (Shard { rank: 2, world: 3 }, 2, master));
    }

    #[test]
    fn torchruns_agent_keeps_its_port() {
        let vars = [
            MASTER.as_slice(),
            &[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("TORCHELASTIC_USE_AGENT_STORE", "True")],
        ]
        .concat();
        assert_eq!(place(&vars).unwrap().unwrap().master.port, 29501);
    }

    #[test]
    fn slurm_variables() {
        let vars = [
            MASTER.as_slice(),
            &[("SLURM_PROCID", "6"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "2"), (RENDEZVOUS_TIMEOUT_ENV, "30")],
        ]
        .concat();
        let place = place(&vars).unwrap().unwrap();
        assert_eq!((place.shard, place.local_rank), (Shard { rank: 6, world: 8 }, 2));
        assert_eq!(place.timeout, Duration::from_secs(30));
    }

    #[test]
    fn no_launcher_means_one_process() {
        assert_eq!(place(&[]).unwrap(), None);
        assert_eq!(place(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("SLURM_LOCALID", "0")]).unwrap(), None);
        assert_eq!(place(&MASTER).unwrap(), None);
    }

    #[test]
    fn torchrun_wins_over_slurm() {
        let vars = [
            MASTER.as_slice(),
            &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"), ("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")],
        ]
        .concat();
        assert_eq!(place(&vars).unwrap().unwrap().shard, Shard { rank: 1, world: 2 });
    }

    #[test]
    fn bad_variables_are_named() {
        let cases: [(&[(&str, &str)], &str); 6] = [
            (&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")], "MASTER_ADDR"),
            (
                &[("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")],
                "WORLD_SIZE is not set",
            ),
            (&[("RANK", "2"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")], "rank 2 of a world of 2"),
            (&[("RANK", "x"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")], "RANK: `x` is not a number"),
            (
                &[
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_RANK", "0"),
                    ("MASTER_ADDR", "a"),
                    ("MASTER_PORT", "99999"),
                ],
                "MASTER_PORT: `99999` is not a port",
            ),
            (
                &[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "0")],
                "SLURM_NTASKS is set, but MASTER_ADDR",
            ),
        ];
        for (vars, expected) in cases {
            let err = place(vars).unwrap_err().to_string();
            assert!(err.contains(expected), "{vars:?}: {err}");
        }
    }

    #[test]
    fn config_differences_name_the_line() {
        assert_eq!(first_difference("a\nb = 1\nc", "a\nb = 2\nc"), Some(("b = 1", "b = 2")));
        assert_eq!(first_difference("a\nb", "a"), Some(("b", "(end)")));
        assert_eq!(first_difference("a\nb", "a\nb"), None);
    }
}
