//! A cuttable TCP link between clients and a broker: a loopback proxy
//! whose connections can be reset or blackholed, for the network fault
//! cases.

use std::{io, net::SocketAddr};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::watch,
    task::JoinHandle,
};

/// What the link does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Forwards both ways.
    Up,
    /// Resets every connection (`RST`) and every new one at once.
    Reset,
    /// Accepts, forwards nothing and closes nothing: a dead network.
    Blackhole,
}

/// A TCP proxy on a loopback port in front of a broker, with two faults:
/// [`reset`](Link::reset) (every connection closed with `RST`, new ones
/// too) and [`blackhole`](Link::blackhole) (connections stay open but
/// nothing passes, no `FIN`, no `RST`: only timeouts and heartbeats notice).
/// [`heal`](Link::heal) brings it back; a connection that survived a
/// blackhole carries on with what was buffered, as after a real partition.
///
/// A client reaches the broker through it by connecting to
/// [`addr`](Link::addr); a broker that advertises its own address (Kafka)
/// must advertise the link's instead, or its clients go around it.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use switchyard_conformance::fault::Link;
///
/// let link = Link::start(0, "127.0.0.1:4222".parse().unwrap()).await?;
/// // connect a client to link.addr() ...
/// link.blackhole(); // the network dies
/// link.heal(); // and comes back
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Link {
    addr: SocketAddr,
    state: watch::Sender<State>,
    accept: JoinHandle<()>,
}

impl Link {
    /// Listens on `127.0.0.1:port` (`0`: a port the OS picks) and forwards
    /// every connection to `target`.
    ///
    /// # Errors
    ///
    /// When the port cannot be bound.
    pub async fn start(port: u16, target: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let (state, _) = watch::channel(State::Up);
        let states = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                tokio::spawn(carry(inbound, target, states.subscribe()));
            }
        });
        Ok(Self {
            addr,
            state,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resets every connection and each new one, until [`heal`](Link::heal).
    pub fn reset(&self) {
        self.state.send_replace(State::Reset);
    }

    /// Stops all traffic without closing anything, until
    /// [`heal`](Link::heal).
    pub fn blackhole(&self) {
        self.state.send_replace(State::Blackhole);
    }

    /// Forwards again.
    pub fn heal(&self) {
        self.state.send_replace(State::Up);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.state.send_replace(State::Reset);
        self.accept.abort();
    }
}

/// One client connection: held while blackholed, reset on a reset.
async fn carry(inbound: TcpStream, target: SocketAddr, mut state: watch::Receiver<State>) {
    let _ = inbound.set_zero_linger();
    // A connection opened into a blackhole waits, unanswered.
    match state.wait_for(|s| *s != State::Blackhole).await.as_deref() {
        Ok(State::Up) => {}
        _ => return,
    }
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = outbound.set_zero_linger();
    let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
    let ((ri, wi), (ro, wo)) = (inbound.into_split(), outbound.into_split());
    let mut reset = state.clone();
    tokio::select! {
        () = pump(ri, wo, state.clone()) => {}
        () = pump(ro, wi, state) => {}
        _ = reset.wait_for(|s| *s == State::Reset) => {}
    }
    // Dropping both halves of both sockets (zero linger) sends `RST`.
}

/// Copies one direction while the link is up; pauses while blackholed.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut state: watch::Receiver<State>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match state.wait_for(|s| *s != State::Blackhole).await.as_deref() {
            Ok(State::Up) => {}
            _ => return,
        }
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}
