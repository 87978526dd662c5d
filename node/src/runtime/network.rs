//! The production network: one libp2p swarm (TCP + Noise + Yamux, QUIC, DNS, identify,
//! ping, libp2p-stream, a peer address store) driven by one task, and node-to-node RPC
//! over long-lived streams that callers use directly, without passing through that task.
//!
//! Why streams and not libp2p request-response: request-response opens a yamux stream
//! and negotiates the protocol for every request, and moves each exchange through the
//! swarm task four times. A profile of small S3 PUTs put about a third of the node's CPU
//! there. Here a request takes an idle stream to its peer from a pool (or opens one),
//! writes one frame, reads one frame and puts the stream back.
//!
//! Admission: every stream starts with the opener's `Admit`, a proof bound to both
//! Noise-authenticated peer ids; the acceptor checks it and answers `Admitted` with its
//! own proof, which the opener checks. Only then does the stream carry requests, one at
//! a time. A peer that sends anything else first, or a bad proof, gets no answer and is
//! disconnected; the cluster logic never hears of it. Both sides open (and so admit) a
//! stream as soon as a connection is up, so a peer is *ready* (it proved membership to
//! us) and the logic hears of it without waiting for traffic.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bdr_protocol::admission::ClusterSecret;
use bdr_protocol::ids::NodeId;
use bdr_protocol::wire::{self, Request, Response};
use bytes::Bytes;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::peer_store::{self, memory_store};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, noise, ping, tcp, yamux, Multiaddr, PeerId, Stream, StreamProtocol, Swarm, SwarmBuilder};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::env::{InboundHandler, NetworkError};
use crate::identity::{node_id_of_peer, peer_of_node_id, NodeIdentity};

const RPC_PROTOCOL: StreamProtocol = StreamProtocol::new(wire::RPC_PROTOCOL_NAME);
/// Commands queued to the swarm task before senders wait.
pub const COMMAND_QUEUE_LENGTH: usize = 1024;
/// Requests to one peer in flight at once, each on its own stream; the pool keeps at most
/// this many streams per peer.
pub const STREAMS_PER_PEER_MAX: usize = 64;
/// Requests waiting for a stream to one peer before further ones fail fast.
pub const PENDING_REQUESTS_PER_PEER_MAX: usize = 256;
/// Inbound requests being handled at once, over all peers.
pub const INBOUND_REQUESTS_IN_FLIGHT_MAX: usize = 512;
/// Inbound streams served at once, over all peers: each member pools up to
/// [`STREAMS_PER_PEER_MAX`] to us, and a stream beyond this bound is dropped unanswered.
pub const INBOUND_STREAMS_MAX: usize = 4096;
/// Peers whose addresses the swarm remembers (least recently used go first).
const PEERS_REMEMBERED_MAX: usize = 65_536;
/// Opening a stream, dial included, and its admission exchange.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// libp2p-stream drops an inbound stream when the acceptor has not yet taken the one
/// before (its queue has one slot), so an open that loses its stream before the
/// admission answer is tried again, this many times in all.
const STREAM_OPEN_ATTEMPTS_MAX: u32 = 3;
/// An inbound stream must bring its `Admit` within this, so silent openers hold nothing.
const ADMIT_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one request exchange; callers use shorter timeouts.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections stay open this long without streams: re-admission costs a round trip.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(300);
/// While no peer is ready, bootstrap addresses are dialled this often.
const BOOTSTRAP_RETRY: Duration = Duration::from_secs(2);
/// Frames up to this size are written with their length prefix in one write, which
/// yamux sends as one frame instead of two.
const COALESCED_FRAME_BYTES_MAX: usize = 64 * 1024;

/// Reads one length-prefixed frame, bounded by [`wire::FRAME_BYTES_MAX`] before allocation.
async fn read_frame<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut prefix = [0u8; 4];
    io.read_exact(&mut prefix).await?;
    let length = wire::check_frame_length(prefix).map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
    let mut body = vec![0u8; length as usize];
    io.read_exact(&mut body).await?;
    Ok(body)
}

/// Writes a frame whose body is `head` then `tail` (see [`wire::FrameParts`]): a shard's
/// bytes go out from where they are, not copied into one buffer with the rest first.
async fn write_frame<T: AsyncWrite + Unpin>(io: &mut T, head: &[u8], tail: &[u8]) -> io::Result<()> {
    let body_bytes = head.len() + tail.len();
    let length =
        u32::try_from(body_bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    // Small pieces go in one write with the length prefix, which yamux sends as one frame.
    if body_bytes <= COALESCED_FRAME_BYTES_MAX {
        let mut frame = Vec::with_capacity(4 + body_bytes);
        frame.extend_from_slice(&length.to_le_bytes());
        frame.extend_from_slice(head);
        frame.extend_from_slice(tail);
        io.write_all(&frame).await?;
        return io.flush().await;
    }
    if head.len() <= COALESCED_FRAME_BYTES_MAX {
        let mut first = Vec::with_capacity(4 + head.len());
        first.extend_from_slice(&length.to_le_bytes());
        first.extend_from_slice(head);
        io.write_all(&first).await?;
    } else {
        io.write_all(&length.to_le_bytes()).await?;
        io.write_all(head).await?;
    }
    io.write_all(tail).await?;
    io.flush().await
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    streams: libp2p_stream::Behaviour,
    /// libp2p-stream dials by peer id alone; this is where the swarm finds addresses.
    addresses: peer_store::Behaviour<memory_store::MemoryStore>,
}

enum Command {
    RememberAddresses {
        peer: PeerId,
        addresses: Vec<Multiaddr>,
    },
    /// Answered once every command queued before it has been applied.
    Flush(oneshot::Sender<()>),
    Disconnect(PeerId),
    /// The cluster logic is bound: tell it about peers admitted so far, then bootstrap.
    HandlerBound,
}

/// Our streams to one peer.
struct PeerStreams {
    /// One per request in flight to this peer.
    permits: Semaphore,
    /// Requests holding or waiting for a stream permit: when none is left, a further
    /// request fails fast.
    queue_places: Semaphore,
    /// Opens are serialized per peer: the acceptor's queue of new streams has one slot.
    opener: tokio::sync::Mutex<libp2p_stream::Control>,
    /// Admitted streams with no request on them.
    idle: Mutex<Vec<Stream>>,
}

impl PeerStreams {
    fn take_idle(&self) -> Option<Stream> {
        self.idle.lock().expect("not poisoned").pop()
    }

    fn put_back(&self, stream: Stream) {
        self.idle.lock().expect("not poisoned").push(stream);
    }
}

/// Why opening an admitted stream failed.
enum OpenError {
    /// No stream: the dial or the protocol negotiation failed.
    Open(String),
    /// The stream opened but ended before the admission answer.
    Dropped(String),
    /// The peer answered without a valid proof of membership.
    Refused,
}

struct Inner {
    me: NodeId,
    secret: ClusterSecret,
    control: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
    peers: Mutex<HashMap<PeerId, Arc<PeerStreams>>>,
    /// Peer ids of node ids asked for: making one decompresses an ed25519 point (about
    /// 2% of a small GET's node CPU when done per request). Emptied when it reaches
    /// [`PEERS_REMEMBERED_MAX`].
    peer_ids: Mutex<HashMap<NodeId, PeerId>>,
    /// Peers whose membership proof we checked, on any stream in either direction.
    verified: Mutex<BTreeSet<PeerId>>,
    /// Peers that answered our `Admit` with a valid proof since their connection came up.
    ready: Mutex<BTreeSet<PeerId>>,
    handler: OnceLock<Arc<dyn InboundHandler>>,
    local_addresses: Mutex<Vec<String>>,
    inbound_requests: Arc<Semaphore>,
    inbound_streams: Arc<Semaphore>,
    /// Inbound streams accepted so far: each one cost its opener an admission round trip.
    inbound_streams_accepted: AtomicU64,
}

/// The handle the rest of the node uses; cheap to clone.
#[derive(Clone)]
pub struct NetworkHandle {
    inner: Arc<Inner>,
}

impl NetworkHandle {
    /// Connects the cluster logic. Until then requests get no answer and bootstrap peers
    /// are not dialled, so no admission can go unnoticed by the logic.
    pub async fn bind_handler(&self, handler: Arc<dyn InboundHandler>) {
        let _ = self.inner.handler.set(handler);
        let _ = self.inner.commands.send(Command::HandlerBound).await;
    }

    pub async fn request(&self, to: NodeId, request: Request) -> Result<Response, NetworkError> {
        let Some(peer) = self.inner.peer_of(&to) else {
            return Err(NetworkError::Unreachable(to.short(), "not an ed25519 node id".into()));
        };
        let body = wire::encode_request_parts(&request)
            .map_err(|error| NetworkError::Failed(to.short(), format!("cannot encode the request: {error}")))?;
        let streams = self.inner.streams_of(peer);
        let Ok(_queue_place) = streams.queue_places.try_acquire() else {
            return Err(NetworkError::Overloaded(to.short()));
        };
        let _permit = streams.permits.acquire().await.expect("the semaphore is never closed");
        let mut stream = match streams.take_idle() {
            Some(stream) => stream,
            None => self.inner.open_admitted_stream(peer, to, &streams).await?,
        };
        let exchange = async {
            write_frame(&mut stream, &body.head, &body.tail).await?;
            read_frame(&mut stream).await
        };
        let answer = match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => return Err(NetworkError::Unreachable(to.short(), error.to_string())),
            Err(_) => return Err(NetworkError::Timeout(to.short())),
        };
        let response = wire::decode_response_shared(&Bytes::from(answer))
            .map_err(|error| NetworkError::Unreachable(to.short(), format!("undecodable response: {error}")))?;
        // Only a stream whose exchange completed goes back: one dropped mid-way (a caller's
        // timeout) may still carry the rest of an answer.
        streams.put_back(stream);
        Ok(response)
    }

    pub fn remember_addresses(&self, node: NodeId, addresses: &[String]) {
        let Some(peer) = self.inner.peer_of(&node) else { return };
        let addresses: Vec<Multiaddr> = addresses.iter().filter_map(|text| text.parse().ok()).collect();
        if addresses.is_empty() {
            return;
        }
        // Best effort: if the queue is full, the next heartbeat brings them again.
        let _ = self
            .inner
            .commands
            .try_send(Command::RememberAddresses { peer, addresses });
    }

    pub fn local_addresses(&self) -> Vec<String> {
        self.inner.local_addresses.lock().expect("not poisoned").clone()
    }

    /// Inbound streams accepted since start; with pooling this grows with concurrency,
    /// not with the number of requests.
    pub fn inbound_streams_accepted(&self) -> u64 {
        self.inner.inbound_streams_accepted.load(Ordering::Relaxed)
    }
}

impl Inner {
    fn peer_of(&self, node: &NodeId) -> Option<PeerId> {
        if let Some(peer) = self.peer_ids.lock().expect("not poisoned").get(node) {
            return Some(*peer);
        }
        let peer = peer_of_node_id(node)?;
        let mut peer_ids = self.peer_ids.lock().expect("not poisoned");
        if peer_ids.len() >= PEERS_REMEMBERED_MAX {
            peer_ids.clear();
        }
        peer_ids.insert(*node, peer);
        Some(peer)
    }

    fn streams_of(&self, peer: PeerId) -> Arc<PeerStreams> {
        let mut peers = self.peers.lock().expect("not poisoned");
        Arc::clone(peers.entry(peer).or_insert_with(|| {
            Arc::new(PeerStreams {
                permits: Semaphore::new(STREAMS_PER_PEER_MAX),
                queue_places: Semaphore::new(STREAMS_PER_PEER_MAX + PENDING_REQUESTS_PER_PEER_MAX),
                opener: tokio::sync::Mutex::new(self.control.clone()),
                idle: Mutex::new(Vec::new()),
            })
        }))
    }

    fn is_ready(&self, peer: &PeerId) -> bool {
        self.ready.lock().expect("not poisoned").contains(peer)
    }

    /// The connection to `peer` closed: its streams are dead and it must prove
    /// membership again. Streams still in use go back to the orphaned entry and die
    /// with it.
    fn forget_peer(&self, peer: &PeerId) {
        self.peers.lock().expect("not poisoned").remove(peer);
        self.verified.lock().expect("not poisoned").remove(peer);
        self.ready.lock().expect("not poisoned").remove(peer);
    }

    fn reject(&self, peer: PeerId, why: &str) {
        tracing::warn!(%peer, why, "refusing a peer that did not prove cluster membership");
        self.forget_peer(&peer);
        let _ = self.commands.try_send(Command::Disconnect(peer));
    }

    async fn open_admitted_stream(
        &self,
        peer: PeerId,
        node: NodeId,
        streams: &PeerStreams,
    ) -> Result<Stream, NetworkError> {
        let mut control = streams.opener.lock().await;
        // A request may have put a stream back while this one waited for the opener.
        if let Some(stream) = streams.take_idle() {
            return Ok(stream);
        }
        if !self.is_ready(&peer) {
            // Addresses from `remember_addresses` travel through the command queue; the
            // dial below must see them.
            let (done, flushed) = oneshot::channel();
            if self.commands.send(Command::Flush(done)).await.is_ok() {
                let _ = flushed.await;
            }
        }
        let mut why = String::new();
        for _ in 0..STREAM_OPEN_ATTEMPTS_MAX {
            let attempt = tokio::time::timeout(STREAM_OPEN_TIMEOUT, self.open_and_admit(&mut control, peer, node));
            match attempt.await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(OpenError::Dropped(error))) => why = format!("stream dropped before admission: {error}"),
                Ok(Err(OpenError::Open(error))) => return Err(NetworkError::Unreachable(node.short(), error)),
                Ok(Err(OpenError::Refused)) => {
                    self.reject(peer, "bad or missing proof in its admission answer");
                    return Err(NetworkError::Unreachable(
                        node.short(),
                        "peer did not prove cluster membership".into(),
                    ));
                }
                Err(_) => return Err(NetworkError::Timeout(node.short())),
            }
        }
        Err(NetworkError::Unreachable(node.short(), why))
    }

    async fn open_and_admit(
        &self,
        control: &mut libp2p_stream::Control,
        peer: PeerId,
        node: NodeId,
    ) -> Result<Stream, OpenError> {
        let mut stream = control
            .open_stream(peer, RPC_PROTOCOL)
            .await
            .map_err(|error| OpenError::Open(error.to_string()))?;
        let admit = wire::encode_request(&Request::Admit {
            proof: self.secret.prove(self.me, node),
        })
        .expect("an admission request is far below the frame bound");
        write_frame(&mut stream, &admit, &[])
            .await
            .map_err(|error| OpenError::Dropped(error.to_string()))?;
        let answer = read_frame(&mut stream)
            .await
            .map_err(|error| OpenError::Dropped(error.to_string()))?;
        let valid = matches!(wire::decode_response(&answer),
            Ok(Response::Admitted { proof }) if self.secret.verify(&proof, &node, &self.me));
        if !valid {
            return Err(OpenError::Refused);
        }
        self.verified.lock().expect("not poisoned").insert(peer);
        let newly_ready = self.ready.lock().expect("not poisoned").insert(peer);
        if newly_ready {
            tracing::info!(peer = %node.short(), "peer admitted");
            if let Some(handler) = self.handler.get() {
                handler.peer_admitted(node);
            }
        }
        Ok(stream)
    }

    /// Opens (and so admits) a stream to a newly connected peer and pools it.
    async fn admit_peer(self: Arc<Self>, peer: PeerId) {
        let Some(node) = node_id_of_peer(&peer) else { return };
        let streams = self.streams_of(peer);
        let Ok(_permit) = streams.permits.try_acquire() else {
            return; // Requests are under way: they admit.
        };
        // An idle stream means the peer is admitted already; it just goes back.
        match self.open_admitted_stream(peer, node, &streams).await {
            Ok(stream) => streams.put_back(stream),
            Err(error) => tracing::debug!(peer = %node.short(), %error, "admission on connect failed"),
        }
    }

    async fn accept_streams(self: Arc<Self>, mut incoming: libp2p_stream::IncomingStreams) {
        // This loop only hands streams on: libp2p-stream drops any that arrive while the
        // previous one waits here.
        while let Some((peer, stream)) = incoming.next().await {
            let Ok(permit) = Arc::clone(&self.inbound_streams).try_acquire_owned() else {
                tracing::warn!(%peer, "too many inbound streams; dropping one");
                continue;
            };
            self.inbound_streams_accepted.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(Arc::clone(&self).serve_stream(peer, stream, permit));
        }
    }

    async fn serve_stream(self: Arc<Self>, peer: PeerId, mut stream: Stream, _permit: OwnedSemaphorePermit) {
        let Some(node) = node_id_of_peer(&peer) else {
            self.reject(peer, "not an ed25519 identity");
            return;
        };
        let Ok(Ok(first)) = tokio::time::timeout(ADMIT_READ_TIMEOUT, read_frame(&mut stream)).await else {
            return;
        };
        let admitted = matches!(wire::decode_request(&first),
            Ok(Request::Admit { proof }) if self.secret.verify(&proof, &node, &self.me));
        if !admitted {
            // No answer at all: a dropped stream tells an intruder nothing.
            self.reject(peer, "bad admission proof, or a request before admission");
            return;
        }
        self.verified.lock().expect("not poisoned").insert(peer);
        let answer = wire::encode_response(&Response::Admitted {
            proof: self.secret.prove(self.me, node),
        })
        .expect("an admission answer is far below the frame bound");
        if write_frame(&mut stream, &answer, &[]).await.is_err() {
            return;
        }
        // The opener closes or drops the stream when done; either ends this loop.
        while let Ok(body) = read_frame(&mut stream).await {
            let request = match wire::decode_request_shared(&Bytes::from(body)) {
                Ok(Request::Admit { .. }) => {
                    tracing::debug!(peer = %node.short(), "a second admission on one stream");
                    return;
                }
                Ok(request) => request,
                Err(error) => {
                    tracing::debug!(peer = %node.short(), %error, "undecodable request");
                    return;
                }
            };
            let Some(handler) = self.handler.get().cloned() else {
                return;
            };
            let response = match Arc::clone(&self.inbound_requests).try_acquire_owned() {
                Ok(_permit) => handler.handle(node, request).await,
                Err(_) => Response::error(wire::RemoteErrorKind::Unavailable, "node overloaded"),
            };
            let body = match wire::encode_response_parts(&response) {
                Ok(body) => body,
                Err(error) => {
                    tracing::warn!(peer = %node.short(), %error, "cannot encode a response");
                    return;
                }
            };
            if write_frame(&mut stream, &body.head, &body.tail).await.is_err() {
                return;
            }
        }
    }
}

pub struct NetworkSettings {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub secret: ClusterSecret,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkStartError {
    #[error("cannot build the libp2p transport: {0}")]
    Transport(String),
    #[error("cannot listen on {address}: {reason}")]
    Listen { address: String, reason: String },
}

/// Builds the swarm, starts listening and spawns the tasks that drive it and accept
/// streams.
pub fn start(identity: &NodeIdentity, settings: NetworkSettings) -> Result<NetworkHandle, NetworkStartError> {
    let transport_error = |error: String| NetworkStartError::Transport(error);
    let address_store_config = memory_store::Config::default()
        .set_peer_capacity(NonZeroUsize::new(PEERS_REMEMBERED_MAX).expect("not zero"))
        .set_record_capacity(NonZeroUsize::new(wire::ADDRESSES_PER_PEER_MAX).expect("not zero"))
        // A node that is down for a while must still be dialled at its addresses when
        // it comes back.
        .set_remove_addr_on_dial_error(false);
    let mut swarm = SwarmBuilder::with_existing_identity(identity.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|error| transport_error(error.to_string()))?
        .with_quic()
        .with_dns()
        .map_err(|error| transport_error(error.to_string()))?
        .with_behaviour(|key| Behaviour {
            identify: identify::Behaviour::new(identify::Config::new("/bdr/1.0.0".into(), key.public())),
            ping: ping::Behaviour::new(ping::Config::new()),
            streams: libp2p_stream::Behaviour::new(),
            addresses: peer_store::Behaviour::new(memory_store::MemoryStore::new(address_store_config)),
        })
        .map_err(|error| transport_error(error.to_string()))?
        .with_swarm_config(|config| config.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
    for address in &settings.listen {
        swarm
            .listen_on(address.clone())
            .map_err(|error| NetworkStartError::Listen {
                address: address.to_string(),
                reason: error.to_string(),
            })?;
    }
    let mut control = swarm.behaviour().streams.new_control();
    let incoming = control
        .accept(RPC_PROTOCOL)
        .expect("a new swarm has no acceptor for the protocol yet");
    let (commands, receiver) = mpsc::channel(COMMAND_QUEUE_LENGTH);
    let inner = Arc::new(Inner {
        me: identity.node_id,
        secret: settings.secret,
        control,
        commands,
        peers: Mutex::new(HashMap::new()),
        peer_ids: Mutex::new(HashMap::new()),
        verified: Mutex::new(BTreeSet::new()),
        ready: Mutex::new(BTreeSet::new()),
        handler: OnceLock::new(),
        local_addresses: Mutex::new(Vec::new()),
        inbound_requests: Arc::new(Semaphore::new(INBOUND_REQUESTS_IN_FLIGHT_MAX)),
        inbound_streams: Arc::new(Semaphore::new(INBOUND_STREAMS_MAX)),
        inbound_streams_accepted: AtomicU64::new(0),
    });
    tokio::spawn(Arc::clone(&inner).accept_streams(incoming));
    let driver = Driver {
        swarm,
        bootstrap: settings.bootstrap,
        inner: Arc::clone(&inner),
    };
    tokio::spawn(driver.run(receiver));
    Ok(NetworkHandle { inner })
}

/// Drives the swarm: connections, dials, addresses. Requests do not pass through it.
struct Driver {
    swarm: Swarm<Behaviour>,
    bootstrap: Vec<Multiaddr>,
    inner: Arc<Inner>,
}

impl Driver {
    async fn run(mut self, mut receiver: mpsc::Receiver<Command>) {
        let mut bootstrap_timer = tokio::time::interval(BOOTSTRAP_RETRY);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = receiver.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                _ = bootstrap_timer.tick() => {
                    let nobody_ready = self.inner.ready.lock().expect("not poisoned").is_empty();
                    if nobody_ready && self.inner.handler.get().is_some() {
                        self.dial_bootstrap();
                    }
                }
            }
        }
    }

    fn dial_bootstrap(&mut self) {
        for address in self.bootstrap.clone() {
            if let Err(error) = self.swarm.dial(address.clone()) {
                tracing::debug!(%address, %error, "cannot dial bootstrap peer");
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::RememberAddresses { peer, addresses } => {
                for address in addresses {
                    self.swarm.add_peer_address(peer, address);
                }
            }
            Command::Flush(done) => {
                let _ = done.send(());
            }
            Command::Disconnect(peer) => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::HandlerBound => {
                if let Some(handler) = self.inner.handler.get() {
                    let ready: Vec<PeerId> = self.inner.ready.lock().expect("not poisoned").iter().copied().collect();
                    for node in ready.iter().filter_map(node_id_of_peer) {
                        handler.peer_admitted(node);
                    }
                }
                self.dial_bootstrap();
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                let mut addresses = self.inner.local_addresses.lock().expect("not poisoned");
                if addresses.len() < wire::ADDRESSES_PER_PEER_MAX {
                    addresses.push(address.to_string());
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                if node_id_of_peer(&peer_id).is_none() {
                    self.inner.reject(peer_id, "not an ed25519 identity");
                    return;
                }
                tokio::spawn(Arc::clone(&self.inner).admit_peer(peer_id));
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => self.inner.forget_peer(&peer_id),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }))
                if self.inner.verified.lock().expect("not poisoned").contains(&peer_id) =>
            {
                for address in info.listen_addrs.into_iter().take(wire::ADDRESSES_PER_PEER_MAX) {
                    self.swarm.add_peer_address(peer_id, address);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdr_protocol::ids::StripeId;
    use futures::future::BoxFuture;

    /// Answers `GetShard` with the requested index in an error message, after a pause
    /// that keeps concurrent requests overlapping, and `PutShard` with the shard it got.
    struct Echo {
        admitted: Mutex<Vec<NodeId>>,
    }

    impl InboundHandler for Echo {
        fn handle(&self, _from: NodeId, request: Request) -> BoxFuture<'static, Response> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                match request {
                    Request::GetShard { index, .. } => {
                        Response::error(wire::RemoteErrorKind::NotFound, format!("index {index}"))
                    }
                    Request::PutShard { shard } => Response::Shard { shard },
                    other => Response::error(wire::RemoteErrorKind::BadRequest, format!("{other:?}")),
                }
            })
        }

        fn peer_admitted(&self, peer: NodeId) {
            self.admitted.lock().expect("not poisoned").push(peer);
        }
    }

    async fn start_member(directory: &std::path::Path, secret: &ClusterSecret) -> (NodeIdentity, NetworkHandle) {
        let (identity, _) = NodeIdentity::load_or_create(directory).expect("identity");
        let handle = start(
            &identity,
            NetworkSettings {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("address")],
                bootstrap: Vec::new(),
                secret: secret.clone(),
            },
        )
        .expect("network starts");
        for _ in 0..200 {
            if !handle.local_addresses().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!handle.local_addresses().is_empty(), "listening");
        (identity, handle)
    }

    fn get_shard(index: u8) -> Request {
        Request::GetShard {
            stripe_id: StripeId([index; 32]),
            index,
        }
    }

    fn expect_echo(response: Result<Response, NetworkError>, index: u8) {
        match response {
            Ok(Response::Error { message, .. }) => assert_eq!(message, format!("index {index}")),
            other => panic!("unexpected answer to request {index}: {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_exchange_over_reused_streams_and_an_intruder_gets_nothing() {
        let directory = tempfile::tempdir().expect("tempdir");
        let secret = ClusterSecret::from_bytes([7; 32]);
        let (_, client) = start_member(&directory.path().join("client"), &secret).await;
        let (server_identity, server) = start_member(&directory.path().join("server"), &secret).await;
        let echo = Arc::new(Echo {
            admitted: Mutex::new(Vec::new()),
        });
        server.bind_handler(Arc::clone(&echo) as Arc<dyn InboundHandler>).await;
        client
            .bind_handler(Arc::new(Echo {
                admitted: Mutex::new(Vec::new()),
            }))
            .await;
        client.remember_addresses(server_identity.node_id, &server.local_addresses());

        // Sequential requests reuse one stream: the server accepts at most the one the
        // client opened plus the client's admission on connect, never one per request.
        for index in 0..50u8 {
            expect_echo(client.request(server_identity.node_id, get_shard(index)).await, index);
        }
        let accepted_after_sequential = server.inbound_streams_accepted();
        assert!(
            (1..=2).contains(&accepted_after_sequential),
            "50 sequential requests took {accepted_after_sequential} streams"
        );

        // Shards of every size go out in parts (a frame's head, then the shard's bytes from
        // where they are) and come back as slices of their frames, intact.
        for length in [0usize, 100, 64 * 1024 - 20, 70_000, (1 << 20) + 3] {
            let shard = bytes::Bytes::from((0..length).map(|index| (index * 31 % 251) as u8).collect::<Vec<u8>>());
            match client
                .request(server_identity.node_id, Request::PutShard { shard: shard.clone() })
                .await
            {
                Ok(Response::Shard { shard: echoed }) => assert!(echoed == shard, "length {length}: other bytes"),
                other => panic!("unexpected answer to a shard of {length} bytes: {other:?}"),
            }
        }

        // Concurrent requests each get their own answer, exactly once, over at most
        // STREAMS_PER_PEER_MAX streams.
        let answers = futures::future::join_all((0..200u32).map(|index| {
            let client = client.clone();
            let node = server_identity.node_id;
            async move { (index as u8, client.request(node, get_shard(index as u8)).await) }
        }))
        .await;
        for (index, answer) in answers {
            expect_echo(answer, index);
        }
        let accepted = server.inbound_streams_accepted();
        assert!(
            accepted <= (STREAMS_PER_PEER_MAX + 2) as u64,
            "200 concurrent requests took {accepted} streams"
        );

        // A node with another secret is neither answered nor admitted.
        let (_, intruder) = start_member(&directory.path().join("intruder"), &ClusterSecret::from_bytes([8; 32])).await;
        intruder
            .bind_handler(Arc::new(Echo {
                admitted: Mutex::new(Vec::new()),
            }))
            .await;
        intruder.remember_addresses(server_identity.node_id, &server.local_addresses());
        match intruder.request(server_identity.node_id, get_shard(1)).await {
            Err(NetworkError::Unreachable(..)) | Err(NetworkError::Timeout(..)) => {}
            other => panic!("an intruder got {other:?}"),
        }
        // A stream that starts with a request instead of `Admit` gets no answer, even
        // from a member's identity.
        let server_peer = peer_of_node_id(&server_identity.node_id).expect("ed25519");
        let mut raw = client
            .inner
            .control
            .clone()
            .open_stream(server_peer, RPC_PROTOCOL)
            .await
            .expect("a stream opens");
        let request = wire::encode_request(&get_shard(3)).expect("encodes");
        write_frame(&mut raw, &request, &[])
            .await
            .expect("the request goes out");
        let answer = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut raw)).await;
        assert!(
            matches!(answer, Ok(Err(_))),
            "a request before admission was answered or left hanging: {answer:?}"
        );
        let admitted = echo.admitted.lock().expect("not poisoned").clone();
        assert_eq!(admitted.len(), 1, "only the member was admitted: {admitted:?}");
        // The member is disconnected for that, and still gets answers afterwards on a
        // new connection, admitted again.
        let mut answer = client.request(server_identity.node_id, get_shard(9)).await;
        for _ in 0..50 {
            if answer.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            answer = client.request(server_identity.node_id, get_shard(9)).await;
        }
        expect_echo(answer, 9);
    }
}
