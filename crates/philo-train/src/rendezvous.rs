//! How the ranks of a multi-process run agree on one value (NCCL's unique id) before NCCL can
//! connect them: rank 0 listens on the master address and hands the value to every other rank,
//! which connects — retrying while rank 0 starts — and says which rank it is. torchrun's TCP
//! store, reduced to the one value a run needs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::error::{Result, TrainError};

fn failed(what: String) -> TrainError {
    TrainError::Config(format!(
        "{what}; every rank needs the same --master_addr and --master_port, and rank 0 must be \
         reachable there"
    ))
}

/// Rank 0: hands `value` to the `world_size − 1` other ranks that connect to `listener`
/// before `deadline`.
pub fn serve(
    listener: &TcpListener,
    world_size: usize,
    value: &[u8],
    deadline: Instant,
) -> Result<()> {
    listener
        .set_nonblocking(true)
        .map_err(|e| failed(format!("rendezvous: {e}")))?;
    let mut served = vec![false; world_size];
    served[0] = true;
    while served.iter().any(|s| !s) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(10))))
                    .map_err(|e| failed(format!("rendezvous with {peer}: {e}")))?;
                let mut rank = [0u8; 4];
                stream
                    .read_exact(&mut rank)
                    .map_err(|e| failed(format!("rendezvous with {peer}: {e}")))?;
                let rank = u32::from_le_bytes(rank) as usize;
                if rank == 0 || rank >= world_size || served[rank] {
                    return Err(failed(format!(
                        "rendezvous: {peer} says it is rank {rank} of {world_size}, which is \
                         taken or out of range"
                    )));
                }
                stream
                    .write_all(&(value.len() as u32).to_le_bytes())
                    .and_then(|()| stream.write_all(value))
                    .map_err(|e| failed(format!("rendezvous with rank {rank} ({peer}): {e}")))?;
                served[rank] = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (0..world_size)
                        .filter(|&r| !served[r])
                        .map(|r| r.to_string())
                        .collect();
                    return Err(failed(format!(
                        "rendezvous: rank(s) {} did not connect to {}",
                        missing.join(", "),
                        listener
                            .local_addr()
                            .map_or("the master address".to_string(), |a| a.to_string())
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(failed(format!("rendezvous: {e}"))),
        }
    }
    Ok(())
}

/// Any rank but 0: the value rank 0 serves at `master`, connecting until `deadline`.
pub fn fetch(master: SocketAddr, rank: usize, deadline: Instant) -> Result<Vec<u8>> {
    let mut stream = loop {
        match TcpStream::connect_timeout(&master, Duration::from_millis(500)) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() >= deadline => {
                return Err(failed(format!(
                    "rendezvous: rank {rank} could not reach rank 0 at {master}: {e}"
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let read = |stream: &mut TcpStream| -> std::io::Result<Vec<u8>> {
        stream.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1)),
        ))?;
        stream.write_all(&(rank as u32).to_le_bytes())?;
        let mut len = [0u8; 4];
        stream.read_exact(&mut len)?;
        let mut value = vec![0u8; u32::from_le_bytes(len) as usize];
        stream.read_exact(&mut value)?;
        Ok(value)
    };
    read(&mut stream).map_err(|e| failed(format!("rendezvous: rank {rank} with {master}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_gets_rank_zeros_value() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let master = listener.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let value: Vec<u8> = (0..128).map(|i| (i * 7) as u8).collect();
        let peers: Vec<_> = (1..4)
            .map(|rank| std::thread::spawn(move || fetch(master, rank, deadline).unwrap()))
            .collect();
        serve(&listener, 4, &value, deadline).unwrap();
        for peer in peers {
            assert_eq!(peer.join().unwrap(), value);
        }
    }

    #[test]
    fn a_missing_rank_is_named_when_time_runs_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let master = listener.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_millis(300);
        let peer = std::thread::spawn(move || fetch(master, 2, deadline).unwrap());
        let error = serve(&listener, 3, b"id", deadline)
            .unwrap_err()
            .to_string();
        assert!(error.contains("rank(s) 1 did not connect"), "{error}");
        assert_eq!(peer.join().unwrap(), b"id");
    }

    #[test]
    fn an_unreachable_master_is_a_clear_error() {
        // A port that was free a moment ago: nobody listens there.
        let master = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let deadline = Instant::now() + Duration::from_millis(300);
        let error = fetch(master, 1, deadline).unwrap_err().to_string();
        assert!(
            error.contains(&format!("rank 1 could not reach rank 0 at {master}")),
            "{error}"
        );
    }
}
