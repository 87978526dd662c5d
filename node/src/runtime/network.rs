//! The production network: one libp2p swarm (TCP + Noise + Yamux, QUIC, DNS, identify,
//! ping, request-response with a bounded postcard codec) driven by one task, reached
//! through a bounded command channel.
//!
//! Admission: on every new connection each side sends `Admit` with a proof bound to both
//! Noise-authenticated peer ids. A peer is *verified* once we checked its proof (from its
//! `Admit` request or its `Admitted` answer) and *ready* for our requests once it answered
//! our `Admit` with a valid `Admitted`. Requests to a peer wait (bounded) until it is
//! ready. A peer that sends anything before proving membership, or a bad proof, gets no
//! answer and is disconnected; the cluster logic never hears of it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bdr_protocol::admission::ClusterSecret;
use bdr_protocol::ids::NodeId;
use bdr_protocol::wire::{self, Request, Response};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder};
use tokio::sync::{mpsc, oneshot};

use crate::env::{InboundHandler, NetworkError};
use crate::identity::{node_id_of_peer, peer_of_node_id, NodeIdentity};

const RPC_PROTOCOL: StreamProtocol = StreamProtocol::new(wire::RPC_PROTOCOL_NAME);
/// Commands queued to the swarm task before senders wait.
pub const COMMAND_QUEUE_LENGTH: usize = 1024;
/// Requests waiting for one peer's admission before further ones fail fast.
pub const PENDING_REQUESTS_PER_PEER_MAX: usize = 256;
/// Inbound requests being handled at once, over all peers.
pub const INBOUND_REQUESTS_IN_FLIGHT_MAX: usize = 512;
/// libp2p's own bound on one request-response exchange; callers use shorter timeouts.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections stay open this long without traffic: re-admission costs a round trip.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(300);
/// While no peer is ready, bootstrap addresses are dialled this often.
const BOOTSTRAP_RETRY: Duration = Duration::from_secs(2);

/// Length-prefixed postcard frames, bounded by [`wire::FRAME_BYTES_MAX`] before allocation.
#[derive(Clone, Default)]
pub struct FrameCodec;

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut prefix = [0u8; 4];
    io.read_exact(&mut prefix).await?;
    let length = wire::check_frame_length(prefix).map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
    let mut body = vec![0u8; length as usize];
    io.read_exact(&mut body).await?;
    Ok(body)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, body: &[u8]) -> io::Result<()> {
    let length =
        u32::try_from(body.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&length.to_le_bytes()).await?;
    io.write_all(body).await?;
    io.flush().await
}

fn invalid_data(error: wire::WireError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Request> {
        wire::decode_request(&read_frame(io).await?).map_err(invalid_data)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Response> {
        wire::decode_response(&read_frame(io).await?).map_err(invalid_data)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Request,
    ) -> io::Result<()> {
        write_frame(io, &wire::encode_request(&request).map_err(invalid_data)?).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Response,
    ) -> io::Result<()> {
        write_frame(io, &wire::encode_response(&response).map_err(invalid_data)?).await
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    rpc: request_response::Behaviour<FrameCodec>,
}

type Reply = oneshot::Sender<Result<Response, NetworkError>>;

enum Command {
    Request {
        to: NodeId,
        request: Request,
        reply: Reply,
    },
    Respond {
        channel: ResponseChannel<Response>,
        response: Response,
    },
    RememberAddresses {
        node: NodeId,
        addresses: Vec<Multiaddr>,
    },
    /// The cluster logic is bound: tell it about peers admitted so far, then bootstrap.
    HandlerBound,
}

/// What an outstanding outbound request is for.
enum Outstanding {
    Admission,
    Caller(Reply),
}

/// The handle the rest of the node uses; cheap to clone.
#[derive(Clone)]
pub struct NetworkHandle {
    commands: mpsc::Sender<Command>,
    local_addresses: Arc<Mutex<Vec<String>>>,
    handler: Arc<OnceLock<Arc<dyn InboundHandler>>>,
}

impl NetworkHandle {
    /// Connects the cluster logic. Until then requests get no answer and bootstrap peers
    /// are not dialled, so no admission can go unnoticed by the logic.
    pub async fn bind_handler(&self, handler: Arc<dyn InboundHandler>) {
        let _ = self.handler.set(handler);
        let _ = self.commands.send(Command::HandlerBound).await;
    }

    pub async fn request(&self, to: NodeId, request: Request) -> Result<Response, NetworkError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Request { to, request, reply })
            .await
            .map_err(|_| NetworkError::Unreachable(to.short(), "network stopped".into()))?;
        answer
            .await
            .map_err(|_| NetworkError::Unreachable(to.short(), "network stopped".into()))?
    }

    pub fn remember_addresses(&self, node: NodeId, addresses: &[String]) {
        let addresses: Vec<Multiaddr> = addresses.iter().filter_map(|text| text.parse().ok()).collect();
        if addresses.is_empty() {
            return;
        }
        // Best effort: if the queue is full, the next heartbeat brings them again.
        let _ = self.commands.try_send(Command::RememberAddresses { node, addresses });
    }

    pub fn local_addresses(&self) -> Vec<String> {
        self.local_addresses.lock().expect("not poisoned").clone()
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

/// Builds the swarm, starts listening and spawns the task that drives it.
pub fn start(identity: &NodeIdentity, settings: NetworkSettings) -> Result<NetworkHandle, NetworkStartError> {
    let transport_error = |error: String| NetworkStartError::Transport(error);
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
            rpc: request_response::Behaviour::with_codec(
                FrameCodec,
                [(RPC_PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(EXCHANGE_TIMEOUT)
                    .with_max_concurrent_streams(256),
            ),
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
    let (commands, receiver) = mpsc::channel(COMMAND_QUEUE_LENGTH);
    let handle = NetworkHandle {
        commands: commands.clone(),
        local_addresses: Arc::new(Mutex::new(Vec::new())),
        handler: Arc::new(OnceLock::new()),
    };
    let driver = Driver {
        me: identity.node_id,
        swarm,
        secret: settings.secret,
        bootstrap: settings.bootstrap,
        commands,
        handle: handle.clone(),
        verified: BTreeSet::new(),
        ready: BTreeSet::new(),
        admitting: BTreeSet::new(),
        pending: BTreeMap::new(),
        outstanding: HashMap::new(),
        inbound_permits: Arc::new(tokio::sync::Semaphore::new(INBOUND_REQUESTS_IN_FLIGHT_MAX)),
    };
    tokio::spawn(driver.run(receiver));
    Ok(handle)
}

struct Driver {
    me: NodeId,
    swarm: Swarm<Behaviour>,
    secret: ClusterSecret,
    bootstrap: Vec<Multiaddr>,
    commands: mpsc::Sender<Command>,
    handle: NetworkHandle,
    /// Peers whose membership proof we checked.
    verified: BTreeSet<PeerId>,
    /// Peers that accepted our proof and proved theirs: our requests may go.
    ready: BTreeSet<PeerId>,
    admitting: BTreeSet<PeerId>,
    pending: BTreeMap<PeerId, Vec<(Request, Reply)>>,
    outstanding: HashMap<OutboundRequestId, Outstanding>,
    inbound_permits: Arc<tokio::sync::Semaphore>,
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
                    if self.ready.is_empty() && self.handle.handler.get().is_some() {
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
            Command::Request { to, request, reply } => self.send(to, request, reply),
            Command::Respond { channel, response } => {
                if self.swarm.behaviour_mut().rpc.send_response(channel, response).is_err() {
                    tracing::debug!("response dropped: the requester went away");
                }
            }
            Command::HandlerBound => {
                if let Some(handler) = self.handle.handler.get() {
                    for peer in &self.ready {
                        if let Some(node) = node_id_of_peer(peer) {
                            handler.peer_admitted(node);
                        }
                    }
                }
                self.dial_bootstrap();
            }
            Command::RememberAddresses { node, addresses } => {
                let Some(peer) = peer_of_node_id(&node) else { return };
                for address in addresses {
                    self.swarm.add_peer_address(peer, address);
                }
            }
        }
    }

    fn send(&mut self, to: NodeId, request: Request, reply: Reply) {
        let Some(peer) = peer_of_node_id(&to) else {
            let _ = reply.send(Err(NetworkError::Unreachable(
                to.short(),
                "not an ed25519 node id".into(),
            )));
            return;
        };
        if self.ready.contains(&peer) {
            let id = self.swarm.behaviour_mut().rpc.send_request(&peer, request);
            self.outstanding.insert(id, Outstanding::Caller(reply));
            return;
        }
        let queue = self.pending.entry(peer).or_default();
        if queue.len() >= PENDING_REQUESTS_PER_PEER_MAX {
            let _ = reply.send(Err(NetworkError::Overloaded(to.short())));
            return;
        }
        queue.push((request, reply));
        self.admit(peer);
    }

    /// Sends our membership proof to `peer` (dialling it if needed), once at a time.
    fn admit(&mut self, peer: PeerId) {
        if self.ready.contains(&peer) || !self.admitting.insert(peer) {
            return;
        }
        let Some(node) = node_id_of_peer(&peer) else { return };
        let proof = self.secret.prove(self.me, node);
        let id = self
            .swarm
            .behaviour_mut()
            .rpc
            .send_request(&peer, Request::Admit { proof });
        self.outstanding.insert(id, Outstanding::Admission);
    }

    fn fail_pending(&mut self, peer: &PeerId, reason: &str) {
        let node = node_id_of_peer(peer)
            .map(|node| node.short())
            .unwrap_or_else(|| peer.to_string());
        for (_, reply) in self.pending.remove(peer).unwrap_or_default() {
            let _ = reply.send(Err(NetworkError::Unreachable(node.clone(), reason.to_string())));
        }
    }

    fn reject(&mut self, peer: PeerId, why: &str) {
        tracing::warn!(%peer, why, "refusing a peer that did not prove cluster membership");
        self.verified.remove(&peer);
        self.ready.remove(&peer);
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                let mut addresses = self.handle.local_addresses.lock().expect("not poisoned");
                if addresses.len() < wire::ADDRESSES_PER_PEER_MAX {
                    addresses.push(address.to_string());
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                if node_id_of_peer(&peer_id).is_none() {
                    self.reject(peer_id, "not an ed25519 identity");
                    return;
                }
                self.admit(peer_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.verified.remove(&peer_id);
                self.ready.remove(&peer_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }))
                if self.verified.contains(&peer_id) =>
            {
                for address in info.listen_addrs.into_iter().take(wire::ADDRESSES_PER_PEER_MAX) {
                    self.swarm.add_peer_address(peer_id, address);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(event)) => self.on_rpc_event(event),
            _ => {}
        }
    }

    fn on_rpc_event(&mut self, event: request_response::Event<Request, Response>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message: Message::Request { request, channel, .. },
                ..
            } => self.on_inbound(peer, request, channel),
            Event::Message {
                peer,
                message: Message::Response { request_id, response },
                ..
            } => match self.outstanding.remove(&request_id) {
                Some(Outstanding::Caller(reply)) => {
                    let _ = reply.send(Ok(response));
                }
                Some(Outstanding::Admission) => self.on_admission_answer(peer, response),
                None => {}
            },
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => match self.outstanding.remove(&request_id) {
                Some(Outstanding::Caller(reply)) => {
                    let node = node_id_of_peer(&peer).map(|node| node.short()).unwrap_or_default();
                    let error = match error {
                        request_response::OutboundFailure::Timeout => NetworkError::Timeout(node),
                        other => NetworkError::Unreachable(node, other.to_string()),
                    };
                    let _ = reply.send(Err(error));
                }
                Some(Outstanding::Admission) => {
                    self.admitting.remove(&peer);
                    self.fail_pending(&peer, &format!("admission failed: {error}"));
                }
                None => {}
            },
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound request failed");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    fn on_admission_answer(&mut self, peer: PeerId, response: Response) {
        self.admitting.remove(&peer);
        let Some(node) = node_id_of_peer(&peer) else { return };
        let valid = matches!(&response, Response::Admitted { proof } if self.secret.verify(proof, &node, &self.me));
        if !valid {
            self.fail_pending(&peer, "peer did not prove cluster membership");
            self.reject(peer, "bad or missing proof in its admission answer");
            return;
        }
        self.verified.insert(peer);
        let newly_ready = self.ready.insert(peer);
        for (request, reply) in self.pending.remove(&peer).unwrap_or_default() {
            let id = self.swarm.behaviour_mut().rpc.send_request(&peer, request);
            self.outstanding.insert(id, Outstanding::Caller(reply));
        }
        if newly_ready {
            tracing::info!(peer = %node.short(), "peer admitted");
            if let Some(handler) = self.handle.handler.get() {
                handler.peer_admitted(node);
            }
        }
    }

    fn on_inbound(&mut self, peer: PeerId, request: Request, channel: ResponseChannel<Response>) {
        let Some(node) = node_id_of_peer(&peer) else {
            self.reject(peer, "not an ed25519 identity");
            return;
        };
        if let Request::Admit { proof } = &request {
            if !self.secret.verify(proof, &node, &self.me) {
                // No answer at all: dropping the channel tells an intruder nothing.
                drop(channel);
                self.reject(peer, "bad admission proof");
                return;
            }
            self.verified.insert(peer);
            let proof = self.secret.prove(self.me, node);
            let _ = self
                .swarm
                .behaviour_mut()
                .rpc
                .send_response(channel, Response::Admitted { proof });
            // Make sure we are admitted by them too, so our requests can flow.
            self.admit(peer);
            return;
        }
        if !self.verified.contains(&peer) {
            drop(channel);
            self.reject(peer, "request before admission");
            return;
        }
        let Some(handler) = self.handle.handler.get().cloned() else {
            drop(channel);
            return;
        };
        let Ok(permit) = Arc::clone(&self.inbound_permits).try_acquire_owned() else {
            let _ = self.swarm.behaviour_mut().rpc.send_response(
                channel,
                Response::error(wire::RemoteErrorKind::Unavailable, "node overloaded"),
            );
            return;
        };
        let commands = self.commands.clone();
        tokio::spawn(async move {
            let response = handler.handle(node, request).await;
            let _ = commands.send(Command::Respond { channel, response }).await;
            drop(permit);
        });
    }
}
