//! `philo finetune --gpus N`: one process per GPU, started the way torchrun starts them. The
//! launcher runs the same command once per GPU of its node with `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` set; each process trains on its GPU
//! (`cuda:LOCAL_RANK`) as one rank of the run, joined to the others over NCCL. On several nodes,
//! start `philo finetune --gpus N --nnodes M --node_rank I --master_addr HOST --master_port P`
//! on every node (node 0's address as HOST). When a rank fails, the launcher stops its node's
//! other ranks and names the one that failed.

use std::ffi::OsString;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

/// How many processes this node starts and where the run's ranks meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Processes (GPUs) on this node.
    pub gpus: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl Launch {
    /// Ranks of the whole run.
    pub fn world_size(&self) -> usize {
        self.gpus * self.nnodes
    }

    /// `program args` once per GPU of this node, each with its rank's environment.
    pub fn commands(&self, program: &Path, args: &[OsString]) -> Vec<(usize, Command)> {
        (0..self.gpus)
            .map(|local| {
                let rank = self.node_rank * self.gpus + local;
                let mut command = Command::new(program);
                command
                    .args(args)
                    .env("RANK", rank.to_string())
                    .env("WORLD_SIZE", self.world_size().to_string())
                    .env("LOCAL_RANK", local.to_string())
                    .env("MASTER_ADDR", &self.master_addr)
                    .env("MASTER_PORT", self.master_port.to_string());
                (rank, command)
            })
            .collect()
    }

    /// Starts this node's ranks (see the module docs) and waits for them.
    pub fn run(&self, program: &Path, args: &[OsString]) -> anyhow::Result<()> {
        if self.gpus == 0 || self.nnodes == 0 || self.node_rank >= self.nnodes {
            anyhow::bail!(
                "--gpus and --nnodes must be at least 1 and --node_rank below --nnodes (got {}, {}, {})",
                self.gpus,
                self.nnodes,
                self.node_rank
            );
        }
        if !cfg!(feature = "nccl") {
            anyhow::bail!(
                "fine-tuning on {} GPUs needs NCCL: build philo with `cargo build --release \
                 --features cuda,nccl` after `eval \"$(PHILO_NCCL=1 scripts/cuda-toolchain.sh)\"`",
                self.world_size()
            );
        }
        if let Some(n) = crate::device::cuda_device_count().filter(|&n| self.gpus > n) {
            anyhow::bail!(
                "--gpus {}: this machine has {n} CUDA device{} (`nvidia-smi -L` lists them)",
                self.gpus,
                if n == 1 { "" } else { "s" }
            );
        }
        run_ranks(self.commands(program, args))
    }
}

/// This process's place in a run, from the environment the launcher sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    /// Where rank 0 hands out NCCL's id.
    pub master: SocketAddr,
}

impl RankEnv {
    /// From the process environment: None when `RANK` is not set (not started as a rank).
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// From `var` (the environment's value of a name): None when `RANK` is missing.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<Self>> {
        if var("RANK").is_none() {
            return Ok(None);
        }
        let number = |name: &str| -> anyhow::Result<usize> {
            let value = var(name).ok_or_else(|| {
                anyhow::anyhow!(
                    "RANK is set but {name} is not: start ranks with philo finetune --gpus N"
                )
            })?;
            value
                .parse()
                .map_err(|_| anyhow::anyhow!("{name}={value} is not a number"))
        };
        let (rank, world_size, local_rank) = (
            number("RANK")?,
            number("WORLD_SIZE")?,
            number("LOCAL_RANK")?,
        );
        if rank >= world_size {
            anyhow::bail!("RANK={rank} is not below WORLD_SIZE={world_size}");
        }
        let host = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = number("MASTER_PORT")?;
        let master = (host.as_str(), port as u16)
            .to_socket_addrs()
            .map_err(|e| anyhow::anyhow!("MASTER_ADDR={host}: {e}"))?
            .next()
            .ok_or_else(|| anyhow::anyhow!("MASTER_ADDR={host} resolves to no address"))?;
        Ok(Some(RankEnv {
            rank,
            world_size,
            local_rank,
            master,
        }))
    }
}

/// How long ranks wait for each other at the rendezvous (loading a model can take minutes).
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(600);

/// This rank's communicator: NCCL on its GPU, joined to the other ranks at the master address.
pub fn communicator(
    env: &RankEnv,
    device: &candle_core::Device,
) -> anyhow::Result<Box<dyn philo_train::comm::Communicator>> {
    #[cfg(feature = "nccl")]
    {
        let candle_core::Device::Cuda(cuda) = device else {
            anyhow::bail!(
                "rank {}: multi-GPU fine-tuning runs on CUDA devices",
                env.rank
            );
        };
        let comm = philo_train::nccl::NcclCommunicator::join(
            cuda,
            env.rank,
            env.world_size,
            env.master,
            RENDEZVOUS_TIMEOUT,
        )?;
        Ok(Box::new(comm))
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = (device, RENDEZVOUS_TIMEOUT);
        anyhow::bail!(
            "rank {} of {}: this philo was built without NCCL (`--features cuda,nccl`)",
            env.rank,
            env.world_size
        )
    }
}

/// Runs the ranks' commands until all have exited. When one fails (or is killed), the others are
/// stopped at once — their NCCL calls would otherwise wait for it forever — and the error names
/// it.
pub fn run_ranks(ranks: Vec<(usize, Command)>) -> anyhow::Result<()> {
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(ranks.len());
    for (rank, mut command) in ranks {
        match command.spawn() {
            Ok(child) => children.push((rank, child)),
            Err(e) => {
                stop(&mut children);
                anyhow::bail!("starting rank {rank}: {e}");
            }
        }
    }
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            let (rank, child) = &mut children[i];
            match child.try_wait()? {
                Some(status) if status.success() => {
                    children.remove(i);
                }
                Some(status) => {
                    let rank = *rank;
                    children.remove(i);
                    stop(&mut children);
                    anyhow::bail!(
                        "rank {rank} exited with {status}; the other ranks of this node were \
                         stopped (resume with --resume latest)"
                    );
                }
                None => i += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Kills and reaps `children`.
fn stop(children: &mut Vec<(usize, Child)>) {
    for (_, child) in children.iter_mut() {
        let _ = child.kill();
    }
    for (_, child) in children.iter_mut() {
        let _ = child.wait();
    }
    children.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Instant;

    fn shell(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[test]
    fn a_failed_rank_stops_the_others_and_is_named() {
        let started = Instant::now();
        let error = run_ranks(vec![(0, shell("sleep 30")), (1, shell("exit 3"))])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("rank 1 exited with exit status: 3"),
            "{error}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the sleeping rank was not stopped"
        );
    }

    #[test]
    fn ranks_that_all_succeed_end_the_launch() {
        run_ranks(vec![(0, shell("exit 0")), (1, shell("sleep 0.2"))]).unwrap();
    }

    #[test]
    fn every_rank_gets_its_environment() {
        let launch = Launch {
            gpus: 2,
            nnodes: 2,
            node_rank: 1,
            master_addr: "10.0.0.1".into(),
            master_port: 29500,
        };
        let commands = launch.commands(Path::new("philo"), &["finetune".into()]);
        let envs: Vec<HashMap<String, String>> = commands
            .iter()
            .map(|(_, c)| {
                c.get_envs()
                    .map(|(k, v)| {
                        let value = v.unwrap().to_string_lossy().to_string();
                        (k.to_string_lossy().to_string(), value)
                    })
                    .collect()
            })
            .collect();
        assert_eq!(commands.iter().map(|(r, _)| *r).collect::<Vec<_>>(), [2, 3]);
        for (local, env) in envs.iter().enumerate() {
            assert_eq!(env["RANK"], (2 + local).to_string());
            assert_eq!(env["LOCAL_RANK"], local.to_string());
            assert_eq!(env["WORLD_SIZE"], "4");
            assert_eq!(env["MASTER_ADDR"], "10.0.0.1");
            assert_eq!(env["MASTER_PORT"], "29500");
        }
    }

    #[test]
    fn the_rank_environment_is_read_and_checked() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(RankEnv::from_vars(vars(&[])).unwrap(), None);
        let env = RankEnv::from_vars(vars(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(env.master, "127.0.0.1:29500".parse().unwrap());
        assert_eq!((env.rank, env.world_size, env.local_rank), (1, 2, 1));
        let error = RankEnv::from_vars(vars(&[("RANK", "2"), ("WORLD_SIZE", "2")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("LOCAL_RANK is not"), "{error}");
        let error = RankEnv::from_vars(vars(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_PORT", "1"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("RANK=2 is not below WORLD_SIZE=2"),
            "{error}"
        );
    }
}
