//! Helpers shared by the integration tests.

use std::net::TcpListener;
use std::time::Duration;

use flotilla_engine::collective::{GroupSpec, Ring};

/// Forms a group of `world` ranks in threads and runs `body` on each.
pub fn with_group<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    body: impl Fn(Ring) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let master = listener.local_addr().expect("addr").to_string();
    let mut listener = Some(listener);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let spec = GroupSpec { rank, world, timeout };
            let master = master.clone();
            let body = body.clone();
            let lead = if rank == 0 { listener.take() } else { None };
            std::thread::spawn(move || {
                let ring = match lead {
                    Some(l) if world > 1 => Ring::lead(spec, l).expect("lead"),
                    Some(_) => Ring::single(),
                    None => Ring::connect(spec, &master).expect("join"),
                };
                body(ring)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
}
