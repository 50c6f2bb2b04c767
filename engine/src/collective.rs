//! Data-parallel collectives over TCP: rendezvous through rank 0 and a ring all-reduce.
//!
//! Wire format: every message is a frame `b"FLTL" | kind: u8 | seq: u64 LE | len: u32 LE |
//! payload`. Data frames carry little-endian f32s; an abort frame carries the lost rank (u32 LE)
//! so a failure seen by one rank travels round the ring and every survivor names the same rank.
//! Sends run concurrently with receives; every read and write has a timeout, so a dead or hung
//! peer turns into [`CollectiveError::PeerLost`] within seconds instead of a hang.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::whereabouts::Whereabouts;

const MAGIC: &[u8; 4] = b"FLTL";
const KIND_DATA: u8 = 1;
const KIND_ABORT: u8 = 2;
const KIND_HELLO: u8 = 3;
/// Rendezvous waits at least this long for every rank: workers of a gang may start minutes apart.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(300);

/// Failures of rendezvous and collectives.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// The group could not be formed.
    #[error("rendezvous failed for rank {rank} of {world}: {reason}")]
    Rendezvous { rank: usize, world: usize, reason: String },
    /// A peer stopped answering or closed its connection.
    #[error("lost rank {lost} (seen by rank {rank}): {reason}")]
    PeerLost { rank: usize, lost: usize, reason: String },
    /// A peer sent something that is not the next expected frame.
    #[error("protocol error from rank {peer} (seen by rank {rank}): {reason}")]
    Protocol { rank: usize, peer: usize, reason: String },
}

type Result<T, E = CollectiveError> = std::result::Result<T, E>;

/// Membership of this process in a data-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupSpec {
    /// This process's rank, `0..world`.
    pub rank: usize,
    /// Number of processes.
    pub world: usize,
    /// How long to wait on a peer before declaring it lost.
    pub timeout: Duration,
}

/// A ring of TCP connections: this rank sends to `rank + 1` and receives from `rank − 1`.
pub struct Ring {
    spec: GroupSpec,
    next: Option<TcpStream>,
    prev: Option<TcpStream>,
    send_seq: u64,
    recv_seq: u64,
    /// Told whenever this rank blocks on its previous peer's data (hang detection).
    whereabouts: Option<Arc<Whereabouts>>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("spec", &self.spec).finish_non_exhaustive()
    }
}

impl Ring {
    /// A group of one: collectives are no-ops.
    pub fn single() -> Self {
        let spec = GroupSpec { rank: 0, world: 1, timeout: Duration::from_secs(1) };
        Self { spec, next: None, prev: None, send_seq: 0, recv_seq: 0, whereabouts: None }
    }

    /// Joins the group whose rank 0 listens at `master` (rank 0 binds it).
    pub fn connect(spec: GroupSpec, master: &str) -> Result<Self> {
        let fail = |reason: String| CollectiveError::Rendezvous {
            rank: spec.rank,
            world: spec.world,
            reason,
        };
        if spec.world <= 1 {
            return Ok(Self::single());
        }
        if spec.rank >= spec.world {
            return Err(fail(format!("RANK must be below WORLD_SIZE ({})", spec.world)));
        }
        let addr = master
            .to_socket_addrs()
            .map_err(|e| fail(format!("cannot resolve master {master}: {e}")))?
            .next()
            .ok_or_else(|| fail(format!("master {master} resolves to no address")))?;
        if spec.rank == 0 {
            // MASTER_ADDR may be a service address that is not local: listen on every interface.
            let any = if addr.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            };
            let bind = SocketAddr::new(any, addr.port());
            let listener = TcpListener::bind(bind)
                .map_err(|e| fail(format!("cannot listen on {bind}: {e}")))?;
            Self::lead(spec, listener)
        } else {
            Self::join(spec, addr)
        }
    }

    /// Rank 0's side of rendezvous on an already bound `listener`.
    pub fn lead(spec: GroupSpec, listener: TcpListener) -> Result<Self> {
        let fail =
            |reason: String| CollectiveError::Rendezvous { rank: 0, world: spec.world, reason };
        let ring_listener =
            bind_like(&listener).map_err(|e| fail(format!("cannot listen: {e}")))?;
        let deadline = Instant::now() + spec.timeout.max(RENDEZVOUS_TIMEOUT);
        let mut members: Vec<Option<(TcpStream, SocketAddr)>> =
            (0..spec.world).map(|_| None).collect();
        let own_ip = listener.local_addr().map_err(|e| fail(e.to_string()))?.ip();
        let own_port = ring_listener.local_addr().map_err(|e| fail(e.to_string()))?.port();
        let mut table = vec![SocketAddr::new(own_ip, own_port); spec.world];
        let mut joined = 1;
        while joined < spec.world {
            let mut stream = accept_until(&listener, deadline)
                .map_err(|e| fail(format!("{} of {} ranks joined: {e}", joined, spec.world)))?;
            let peer_ip = stream.peer_addr().map_err(|e| fail(e.to_string()))?.ip();
            stream.set_read_timeout(Some(spec.timeout)).map_err(|e| fail(e.to_string()))?;
            let hello = read_frame(&mut stream).map_err(|e| fail(format!("bad hello: {e}")))?;
            let (rank, world, port) =
                parse_hello(&hello.1).ok_or_else(|| fail("malformed hello".into()))?;
            if world != spec.world {
                return Err(fail(format!(
                    "rank {rank} has WORLD_SIZE {world}, expected {}",
                    spec.world
                )));
            }
            if rank == 0 || rank >= spec.world || members[rank].is_some() {
                return Err(fail(format!("unexpected or duplicate rank {rank}")));
            }
            table[rank] = SocketAddr::new(peer_ip, port);
            members[rank] = Some((stream, table[rank]));
            joined += 1;
        }
        let encoded = encode_table(&table);
        for (stream, _) in members.iter_mut().flatten() {
            write_frame(stream, KIND_HELLO, 0, &encoded)
                .map_err(|e| fail(format!("sending table: {e}")))?;
        }
        Self::link(spec, &ring_listener, &table, deadline)
    }

    fn join(spec: GroupSpec, master: SocketAddr) -> Result<Self> {
        let fail = |reason: String| CollectiveError::Rendezvous {
            rank: spec.rank,
            world: spec.world,
            reason,
        };
        let deadline = Instant::now() + spec.timeout.max(RENDEZVOUS_TIMEOUT);
        let mut stream =
            connect_until(master, deadline).map_err(|e| fail(format!("master {master}: {e}")))?;
        let ring_listener = bind_like_addr(stream.local_addr().map_err(|e| fail(e.to_string()))?)
            .map_err(|e| fail(format!("cannot listen: {e}")))?;
        let port = ring_listener.local_addr().map_err(|e| fail(e.to_string()))?.port();
        let hello = [spec.rank as u32, spec.world as u32, u32::from(port)];
        let hello: Vec<u8> = hello.iter().flat_map(|v| v.to_le_bytes()).collect();
        write_frame(&mut stream, KIND_HELLO, 0, &hello).map_err(|e| fail(format!("hello: {e}")))?;
        let remaining =
            deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        stream.set_read_timeout(Some(remaining)).map_err(|e| fail(e.to_string()))?;
        let (_, payload) =
            read_frame(&mut stream).map_err(|e| fail(format!("waiting for the table: {e}")))?;
        let mut table = decode_table(&payload).ok_or_else(|| fail("malformed table".into()))?;
        // Rank 0 listens on every interface; reach it where its master port was reached.
        if let Some(first) = table.first_mut() {
            first.set_ip(master.ip());
        }
        if table.len() != spec.world {
            return Err(fail(format!("table has {} ranks, expected {}", table.len(), spec.world)));
        }
        Self::link(spec, &ring_listener, &table, deadline)
    }

    /// Connects to the next rank and accepts the previous one.
    fn link(
        spec: GroupSpec,
        listener: &TcpListener,
        table: &[SocketAddr],
        deadline: Instant,
    ) -> Result<Self> {
        let fail = |reason: String| CollectiveError::Rendezvous {
            rank: spec.rank,
            world: spec.world,
            reason,
        };
        let next_rank = (spec.rank + 1) % spec.world;
        let mut next = connect_until(table[next_rank], deadline)
            .map_err(|e| fail(format!("connecting to rank {next_rank}: {e}")))?;
        write_frame(&mut next, KIND_HELLO, 0, &(spec.rank as u32).to_le_bytes())
            .map_err(|e| fail(format!("greeting rank {next_rank}: {e}")))?;
        let mut prev = accept_until(listener, deadline)
            .map_err(|e| fail(format!("waiting for previous rank: {e}")))?;
        prev.set_read_timeout(Some(spec.timeout)).map_err(|e| fail(e.to_string()))?;
        let (_, greeting) = read_frame(&mut prev).map_err(|e| fail(format!("greeting: {e}")))?;
        let expected = (spec.rank + spec.world - 1) % spec.world;
        if greeting != (expected as u32).to_le_bytes() {
            return Err(fail(format!("expected a connection from rank {expected}")));
        }
        for s in [&next, &prev] {
            s.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
            s.set_read_timeout(Some(spec.timeout)).map_err(|e| fail(e.to_string()))?;
            s.set_write_timeout(Some(spec.timeout)).map_err(|e| fail(e.to_string()))?;
        }
        Ok(Self {
            spec,
            next: Some(next),
            prev: Some(prev),
            send_seq: 0,
            recv_seq: 0,
            whereabouts: None,
        })
    }

    /// Report every wait on the previous peer's data to `whereabouts`.
    pub fn watch(&mut self, whereabouts: Arc<Whereabouts>) {
        self.whereabouts = Some(whereabouts);
    }

    /// This process's place in the group.
    pub fn spec(&self) -> GroupSpec {
        self.spec
    }

    /// Sums `values` element-wise across all ranks; every rank ends with identical bits.
    pub fn all_reduce_sum(&mut self, values: &mut [f32]) -> Result<()> {
        let world = self.spec.world;
        if world == 1 {
            return Ok(());
        }
        let rank = self.spec.rank;
        let bounds: Vec<usize> = (0..=world).map(|i| values.len() * i / world).collect();
        let chunk = |i: usize| bounds[i % world]..bounds[i % world + 1];
        // Reduce-scatter: after world−1 steps rank r holds the full sum of chunk r+1.
        for step in 0..world - 1 {
            let send = chunk(rank + world - step);
            let recv = chunk(rank + world - step - 1);
            let incoming = self.exchange(&values[send])?;
            self.check_len(&incoming, recv.len())?;
            values[recv].iter_mut().zip(&incoming).for_each(|(v, x)| *v += x);
        }
        // All-gather: pass the finished chunks round the ring.
        for step in 0..world - 1 {
            let send = chunk(rank + 1 + world - step);
            let recv = chunk(rank + world - step);
            let incoming = self.exchange(&values[send])?;
            self.check_len(&incoming, recv.len())?;
            values[recv].copy_from_slice(&incoming);
        }
        Ok(())
    }

    fn check_len(&self, got: &[f32], want: usize) -> Result<()> {
        if got.len() == want {
            return Ok(());
        }
        Err(CollectiveError::Protocol {
            rank: self.spec.rank,
            peer: self.prev_rank(),
            reason: format!("expected {want} values, got {}", got.len()),
        })
    }

    fn prev_rank(&self) -> usize {
        (self.spec.rank + self.spec.world - 1) % self.spec.world
    }

    fn next_rank(&self) -> usize {
        (self.spec.rank + 1) % self.spec.world
    }

    /// Sends `out` to the next rank while receiving the previous rank's message.
    fn exchange(&mut self, out: &[f32]) -> Result<Vec<f32>> {
        let payload: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
        let seq = self.send_seq;
        self.send_seq += 1;
        let (rank, next_rank) = (self.spec.rank, self.next_rank());
        let (Some(next), Some(prev)) = (self.next.as_mut(), self.prev.as_mut()) else {
            return Err(CollectiveError::PeerLost {
                rank,
                lost: next_rank,
                reason: "ring is closed".into(),
            });
        };
        let prev_rank = ((rank + self.spec.world - 1) % self.spec.world) as u32;
        let waiting = self.whereabouts.as_ref().map(|w| (w, w.wait_on(prev_rank)));
        let (sent, received) = std::thread::scope(|s| {
            let sender = s.spawn(move || write_frame(next, KIND_DATA, seq, &payload));
            let received = read_frame(prev);
            (sender.join().unwrap_or_else(|_| Err(io::Error::other("sender panicked"))), received)
        });
        if let Some((w, before)) = waiting {
            w.restore(before);
        }
        let (kind, seq_in, payload) = match received {
            Ok((kind, payload)) => (kind.0, kind.1, payload),
            Err(e) => return Err(self.fail_ring(self.prev_rank(), e.to_string())),
        };
        if kind == KIND_ABORT {
            let lost = payload.get(..4).map_or(self.prev_rank(), |b| {
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
            });
            return Err(self.fail_ring(lost, format!("rank {} reported it lost", self.prev_rank())));
        }
        if let Err(e) = sent {
            return Err(self.fail_ring(self.next_rank(), e.to_string()));
        }
        if kind != KIND_DATA || seq_in != self.recv_seq {
            return Err(CollectiveError::Protocol {
                rank: self.spec.rank,
                peer: self.prev_rank(),
                reason: format!(
                    "expected data frame {}, got kind {kind} seq {seq_in}",
                    self.recv_seq
                ),
            });
        }
        self.recv_seq += 1;
        Ok(payload.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// Tells the next rank which rank is lost, closes the ring and returns the error.
    fn fail_ring(&mut self, lost: usize, reason: String) -> CollectiveError {
        let next_rank = self.next_rank();
        if let Some(mut next) = self.next.take().filter(|_| lost != next_rank) {
            let _ = next.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = write_frame(&mut next, KIND_ABORT, self.send_seq, &(lost as u32).to_le_bytes());
        }
        self.next = None;
        self.prev = None;
        self.lost(lost, reason)
    }

    fn lost(&self, lost: usize, reason: String) -> CollectiveError {
        CollectiveError::PeerLost { rank: self.spec.rank, lost, reason }
    }
}

fn write_frame(stream: &mut TcpStream, kind: u8, seq: u64, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| io::Error::other("frame too large"))?;
    let mut header = Vec::with_capacity(17);
    header.extend_from_slice(MAGIC);
    header.push(kind);
    header.extend_from_slice(&seq.to_le_bytes());
    header.extend_from_slice(&len.to_le_bytes());
    stream.write_all(&header)?;
    stream.write_all(payload)?;
    stream.flush()
}

/// Reads one frame: `((kind, seq), payload)`.
fn read_frame(stream: &mut TcpStream) -> io::Result<((u8, u64), Vec<u8>)> {
    let mut header = [0u8; 17];
    stream.read_exact(&mut header).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => io::Error::new(e.kind(), "connection closed"),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            io::Error::new(e.kind(), "timed out")
        }
        _ => e,
    })?;
    if &header[..4] != MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad frame magic"));
    }
    let seq = u64::from_le_bytes(header[5..13].try_into().map_err(io::Error::other)?);
    let len = u32::from_le_bytes(header[13..17].try_into().map_err(io::Error::other)?) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload)?;
    Ok(((header[4], seq), payload))
}

fn parse_hello(payload: &[u8]) -> Option<(usize, usize, u16)> {
    let words: Vec<u32> =
        payload.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    match words[..] {
        [rank, world, port] => Some((rank as usize, world as usize, u16::try_from(port).ok()?)),
        _ => None,
    }
}

fn encode_table(table: &[SocketAddr]) -> Vec<u8> {
    table.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n").into_bytes()
}

fn decode_table(payload: &[u8]) -> Option<Vec<SocketAddr>> {
    std::str::from_utf8(payload).ok()?.lines().map(|l| l.parse().ok()).collect()
}

fn bind_like(listener: &TcpListener) -> io::Result<TcpListener> {
    bind_like_addr(listener.local_addr()?)
}

fn bind_like_addr(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::new(addr.ip(), 0))
}

fn accept_until(listener: &TcpListener, deadline: Instant) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "timed out waiting for peers",
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

fn connect_until(addr: SocketAddr, deadline: Instant) -> io::Result<TcpStream> {
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
