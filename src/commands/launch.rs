//! `retinanet train --gpus 0,1,...`: starts one copy of this program per GPU
//! (a rank), each with the same arguments and its place in the environment
//! under torchrun's names (`candle_retinanet::train::Place`), with rank 0
//! listening on a free port of 127.0.0.1; then waits for them. When a rank
//! fails, the others are stopped (they would wait for it forever in their
//! next all-reduce) and the run fails.

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use candle_retinanet::train::{Master, Place};

/// The GPU ordinals of `--gpus`: a comma-separated list of distinct numbers.
pub(super) fn parse_gpus(list: &str) -> Result<Vec<usize>> {
    let mut gpus = Vec::new();
    for item in list.split(',') {
        let gpu: usize = item.trim().parse().with_context(|| format!("--gpus {list}: `{item}` is not a GPU number"))?;
        if gpus.contains(&gpu) {
            bail!("--gpus {list}: GPU {gpu} is listed twice (NCCL runs one rank per GPU)");
        }
        gpus.push(gpu);
    }
    Ok(gpus)
}

/// Starts a rank per GPU into the run folder `out` and waits for all of
/// them. A Ctrl-C reaches every rank from the terminal; they agree on a
/// step to stop at and rank 0 saves a checkpoint, so this process only waits.
pub(super) fn launch(gpus: &[usize], out: &Path) -> Result<()> {
    let master = Master { host: "127.0.0.1".into(), port: free_port()? };
    let program = std::env::current_exe().context("cannot find this program to start the ranks")?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let names_folder = |a: &std::ffi::OsString| {
        let a = a.to_string_lossy();
        ["--out", "--resume"].iter().any(|flag| a == *flag || a.starts_with(&format!("{flag}=")))
    };
    if !args.iter().any(names_folder) {
        args.extend(["--out".into(), out.as_os_str().to_owned()]);
    }
    ctrlc::set_handler(|| {}).context("cannot install the Ctrl-C handler")?;
    let mut ranks: Vec<(usize, Child)> = Vec::with_capacity(gpus.len());
    for (rank, &gpu) in gpus.iter().enumerate() {
        let child = Command::new(&program).args(&args).envs(Place::local_vars(rank, gpus.len(), &master)).spawn();
        match child {
            Ok(child) => ranks.push((gpu, child)),
            Err(err) => {
                stop_all(&mut ranks);
                bail!("cannot start rank {rank} (GPU {gpu}): {err}");
            }
        }
    }
    wait_all(ranks)
}

/// A port that was free a moment ago, for rank 0 to listen on (torchrun's
/// `--standalone` picks its port the same way).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port for the ranks")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until every rank has ended; the first to fail stops the rest.
fn wait_all(mut ranks: Vec<(usize, Child)>) -> Result<()> {
    let mut running: Vec<usize> = (0..ranks.len()).collect();
    while !running.is_empty() {
        let mut still = Vec::with_capacity(running.len());
        for rank in running {
            let (gpu, child) = &mut ranks[rank];
            match child.try_wait().with_context(|| format!("cannot wait for rank {rank}"))? {
                None => still.push(rank),
                Some(status) if status.success() => {}
                Some(status) => {
                    let gpu = *gpu;
                    stop_all(&mut ranks);
                    bail!("rank {rank} (GPU {gpu}) failed ({status}); stopped the other ranks");
                }
            }
        }
        running = still;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn stop_all(ranks: &mut [(usize, Child)]) {
    for (_, child) in ranks.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_lists() {
        assert_eq!(parse_gpus("0").unwrap(), vec![0]);
        assert_eq!(parse_gpus("3, 1,2").unwrap(), vec![3, 1, 2]);
        for (list, expected) in [("0,0", "listed twice"), ("0,x", "`x` is not a GPU number"), ("", "not a GPU number")]
        {
            let err = parse_gpus(list).unwrap_err().to_string();
            assert!(err.contains(expected), "{list}: {err}");
        }
    }
}
