//! Ports for the processes of a test: free ones, and bases for ranges the operator and agents
//! count up from.

/// A port nobody listens on now (the OS's choice).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A seed for port choices that differs between runs and processes.
fn port_seed() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761)
}

/// A base for the operator's rendezvous ports (it adds up to 1,000 per job): 20000–26999, below
/// Linux's ephemeral range (32768 and up) where the OS hands out ports on its own, so a worker's
/// `MASTER_PORT` cannot collide with a connection or a port-0 listener of another process.
pub fn master_port_base() -> String {
    (20_000 + port_seed() % 6_000).to_string()
}

/// A first serving port for service replicas (each takes the next free one): 27000–32099, above
/// the rendezvous ports and below the ephemeral range, for the same reason.
pub fn serving_port_base() -> u16 {
    27_000 + (port_seed() % 5_000) as u16
}
