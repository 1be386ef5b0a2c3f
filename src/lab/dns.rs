//! A scripted DNS server on loopback UDP, for the lab's named targets and for tests: a handler
//! decides each query's reply (addresses with a TTL, NODATA, NXDOMAIN, REFUSED, SERVFAIL, a
//! delay, or silence), and every query is counted per name and type (a retransmission, same
//! message id, is the same query). Messages are parsed and
//! written with hickory-proto, so the resolver under test talks to a real DNS wire format.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::proto::op::{Message, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use parking_lot::{Mutex, RwLock};
use tokio::net::UdpSocket;

/// Record types the server tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QType {
    /// IPv4 addresses.
    A,
    /// IPv6 addresses.
    Aaaa,
    /// Anything else (answered NODATA by [`LabDns::zone`]).
    Other,
}

/// One query as the handler sees it.
#[derive(Clone, Debug)]
pub struct DnsQuery {
    /// The name asked, lower-case, without the trailing dot.
    pub name: String,
    /// Its type.
    pub qtype: QType,
    /// How many queries for this name and type came before this one (0 for the first).
    pub nth: u64,
}

/// What the server does with a query.
#[derive(Clone, Debug)]
pub enum Reply {
    /// These addresses (those of the asked family), with this TTL in seconds.
    Addrs(Vec<IpAddr>, u32),
    /// NOERROR with no records (the name exists, not with this type).
    NoData,
    /// NXDOMAIN.
    NxDomain,
    /// REFUSED.
    Refused,
    /// SERVFAIL.
    ServFail,
    /// No reply at all (a dropped packet or a dead server).
    Drop,
    /// The inner reply, after a delay.
    Delayed(Duration, Box<Reply>),
}

/// Decides the reply to each query.
pub type Handler = Arc<dyn Fn(&DnsQuery) -> Reply + Send + Sync>;

struct State {
    handler: RwLock<Handler>,
    /// Distinct queries per name and type.
    counts: Mutex<HashMap<(String, QType), u64>>,
    /// Each distinct query (name, type, message id) and its `nth`: a resolver's retransmission
    /// of a query it got no answer to (same id) is the same query, answered the same way.
    seen: Mutex<HashMap<(String, QType, u16), u64>>,
}

/// The server; stops when dropped.
pub struct LabDns {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl LabDns {
    /// Starts on `127.0.0.1`, port chosen by the system.
    pub async fn start(handler: Handler) -> std::io::Result<LabDns> {
        Self::start_on("127.0.0.1:0".parse().expect("address"), handler).await
    }

    /// Starts on `addr`.
    pub async fn start_on(addr: SocketAddr, handler: Handler) -> std::io::Result<LabDns> {
        let sock = Arc::new(UdpSocket::bind(addr).await?);
        let addr = sock.local_addr()?;
        let state = Arc::new(State {
            handler: RwLock::new(handler),
            counts: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(q) = query.queries.first() else {
                    continue;
                };
                let name = q.name().to_ascii().to_ascii_lowercase();
                let name = name.strip_suffix('.').unwrap_or(&name).to_string();
                let qtype = match q.query_type() {
                    RecordType::A => QType::A,
                    RecordType::AAAA => QType::Aaaa,
                    _ => QType::Other,
                };
                let id = query.metadata.id;
                let nth = *st
                    .seen
                    .lock()
                    .entry((name.clone(), qtype, id))
                    .or_insert_with(|| {
                        let mut counts = st.counts.lock();
                        let c = counts.entry((name.clone(), qtype)).or_insert(0);
                        *c += 1;
                        *c - 1
                    });
                let reply = (st.handler.read())(&DnsQuery { name, qtype, nth });
                let sock = sock.clone();
                tokio::spawn(async move {
                    let mut reply = reply;
                    while let Reply::Delayed(d, inner) = reply {
                        tokio::time::sleep(d).await;
                        reply = *inner;
                    }
                    if let Some(bytes) = encode(&query, qtype, reply) {
                        let _ = sock.send_to(&bytes, peer).await;
                    }
                });
            }
        });
        Ok(LabDns { addr, state, task })
    }

    /// Its address (give it to `upstream.dns_servers`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the handler (e.g. to start an outage).
    pub fn set_handler(&self, handler: Handler) {
        *self.state.handler.write() = handler;
    }

    /// Distinct queries received for `name` of type `qtype` (retransmissions of one query —
    /// same message id — count once).
    pub fn queries(&self, name: &str, qtype: QType) -> u64 {
        self.state
            .counts
            .lock()
            .get(&(name.to_string(), qtype))
            .copied()
            .unwrap_or(0)
    }

    /// Distinct queries received in all.
    pub fn total_queries(&self) -> u64 {
        self.state.counts.lock().values().sum()
    }

    /// A handler answering the names of `zone` with their addresses (TTL `ttl` seconds),
    /// NODATA for a family a name has no address of, NXDOMAIN for other names.
    pub fn zone(zone: HashMap<String, Vec<IpAddr>>, ttl: u32) -> Handler {
        Arc::new(move |q: &DnsQuery| match zone.get(&q.name) {
            None => Reply::NxDomain,
            Some(ips) => {
                let ips: Vec<IpAddr> = ips
                    .iter()
                    .copied()
                    .filter(|ip| match q.qtype {
                        QType::A => ip.is_ipv4(),
                        QType::Aaaa => ip.is_ipv6(),
                        QType::Other => false,
                    })
                    .collect();
                if ips.is_empty() {
                    Reply::NoData
                } else {
                    Reply::Addrs(ips, ttl)
                }
            }
        })
    }

    /// A handler that never answers.
    pub fn silent() -> Handler {
        Arc::new(|_: &DnsQuery| Reply::Drop)
    }
}

impl Drop for LabDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reply message to `query`, or `None` to stay silent.
fn encode(query: &Message, qtype: QType, reply: Reply) -> Option<Vec<u8>> {
    let mut m = Message::response(query.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_queries(query.queries.iter().cloned());
    let name = query.queries.first()?.name().clone();
    match reply {
        Reply::Drop | Reply::Delayed(..) => return None,
        Reply::Addrs(ips, ttl) => {
            for ip in ips {
                let rdata = match (ip, qtype) {
                    (IpAddr::V4(v4), QType::A) => RData::A(A(v4)),
                    (IpAddr::V6(v6), QType::Aaaa) => RData::AAAA(AAAA(v6)),
                    _ => continue,
                };
                m.add_answer(Record::from_rdata(name.clone(), ttl, rdata));
            }
        }
        Reply::NoData => {}
        Reply::NxDomain => m.metadata.response_code = ResponseCode::NXDomain,
        Reply::Refused => m.metadata.response_code = ResponseCode::Refused,
        Reply::ServFail => m.metadata.response_code = ResponseCode::ServFail,
    }
    m.to_vec().ok()
}
