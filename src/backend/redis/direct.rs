//! A Redis connection that does its I/O in the task of the operation using
//! it.
//!
//! redis-rs' multiplexed connection sends every command through a driver
//! task of its own: a command wakes that task, and its reply wakes the
//! caller again, two cross-thread wake-ups per command on top of the
//! socket's. A pooled connection serves one operation at a time anyway, so
//! [`Direct`] writes the command and reads the reply itself, in the
//! caller's task, and the pool (deadpool, also in the caller's task) hands
//! it to one operation at a time. Replies are decoded into redis-rs'
//! `Value`, so the keyspace code is the same for both kinds of connection,
//! by a RESP2 decoder of its own ([`decode`]): redis-rs' parser costs about
//! 1 500 instructions per reply, a third of a whole Redis operation's share
//! of Prism's work; error replies still go through redis-rs' parser, so
//! their codes read the same.
//!
//! A request cut off half-way (its future dropped at a deadline, or its
//! caller gone) leaves its reply on the way. The connection then counts as
//! broken: it answers nothing more, and the pool discards it at the next
//! checkout instead of handing it out with a stray reply in its stream.
//!
//! Plain TCP and Unix-socket URLs with RESP2 connect directly; TLS
//! (`rediss://`) and RESP3 (`?protocol=resp3`) keep the multiplexed
//! connection ([`Conn::Multiplexed`]).

use std::io;
use std::time::Duration;

use bytes::Buf;
use bytes::BytesMut;
use deadpool_redis::redis::aio::{AsyncStream, ConnectionLike, MultiplexedConnection};
use deadpool_redis::redis::{
    self, Cmd, ConnectionAddr, ConnectionInfo, Pipeline, ProtocolVersion, RedisError, RedisFuture,
    RedisResult, Value,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A pooled Redis connection: direct where the URL allows, multiplexed
/// otherwise.
pub(crate) enum Conn {
    Direct(Direct),
    Multiplexed(MultiplexedConnection),
}

impl Conn {
    /// The connection without its own per-command timeout, for an
    /// operation that bounds all of its commands with one deadline of its
    /// own (and drops the connection when it is cut off).
    pub(crate) fn within_deadline(&mut self) -> WithinDeadline<'_> {
        WithinDeadline(self)
    }

    /// Whether the connection may still carry a request: false once a
    /// request was cut off or failed on the wire.
    pub(crate) fn is_usable(&self) -> bool {
        match self {
            Conn::Direct(direct) => !direct.broken,
            Conn::Multiplexed(_) => true,
        }
    }
}

/// How a direct connection is opened: the address and handshake of a URL
/// that allows one.
#[derive(Clone, Debug)]
pub(crate) struct DirectTarget {
    addr: ConnectionAddr,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    /// Longest wait for the reply to one command outside an operation's
    /// own deadline (purges, health checks, the handshake).
    command_timeout: Duration,
}

impl DirectTarget {
    /// The direct target of `info`, or `None` when the connection must be
    /// multiplexed (TLS or RESP3).
    pub(crate) fn of(info: &ConnectionInfo, command_timeout: Duration) -> Option<DirectTarget> {
        let addr = match info.addr() {
            addr @ (ConnectionAddr::Tcp(..) | ConnectionAddr::Unix(_)) => addr.clone(),
            _ => return None,
        };
        let redis = info.redis_settings();
        if redis.protocol() != ProtocolVersion::RESP2 {
            return None;
        }
        Some(DirectTarget {
            addr,
            username: redis.username().map(str::to_owned),
            password: redis.password().map(str::to_owned),
            db: redis.db(),
            command_timeout,
        })
    }

    /// Connects and authenticates, selecting the URL's database.
    pub(crate) async fn connect(&self) -> RedisResult<Direct> {
        let stream: Box<dyn AsyncStream + Send + Sync + Unpin> = match &self.addr {
            ConnectionAddr::Tcp(host, port) => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
            #[cfg(unix)]
            ConnectionAddr::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
            _ => {
                return Err(RedisError::from(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "this address needs a multiplexed connection",
                )))
            }
        };
        let mut direct = Direct {
            stream,
            read: BytesMut::with_capacity(READ_CHUNK),
            write: Vec::with_capacity(256),
            broken: false,
            db: self.db,
            timeout: Some(self.command_timeout),
        };
        if let Some(password) = &self.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(username) = &self.username {
                auth.arg(username);
            }
            auth.arg(password);
            direct.handshake(&auth).await?;
        }
        if self.db != 0 {
            direct.handshake(redis::cmd("SELECT").arg(self.db)).await?;
        }
        Ok(direct)
    }
}

/// How many bytes a read asks for at least.
const READ_CHUNK: usize = 4096;

/// One connection to Redis, used by one request at a time, in the
/// request's own task.
pub(crate) struct Direct {
    stream: Box<dyn AsyncStream + Send + Sync + Unpin>,
    /// Received bytes not yet decoded.
    read: BytesMut,
    /// The command being sent (kept to reuse its allocation).
    write: Vec<u8>,
    /// Set while a request is on the wire, cleared when its last reply has
    /// been read: a connection left set was cut off (or failed) mid-request
    /// and is never used again.
    broken: bool,
    db: i64,
    /// The per-command timeout outside an operation's own deadline.
    timeout: Option<Duration>,
}

impl Direct {
    /// Sends `self.write` and reads `skip + count` replies, keeping the last
    /// `count`. The first error reply among the skipped ones (a command of
    /// a transaction the server refused to queue) is the result.
    async fn exchange(&mut self, skip: usize, count: usize) -> RedisResult<Vec<Value>> {
        self.begin()?;
        self.stream.write_all(&self.write).await?;
        let mut refused = None;
        for _ in 0..skip {
            if let Value::ServerError(e) = self.receive().await? {
                refused.get_or_insert(e);
            }
        }
        let mut values = Vec::with_capacity(count);
        for _ in 0..count {
            values.push(self.receive().await?);
        }
        self.broken = false;
        match refused {
            Some(e) => Err(e.into()),
            None => Ok(values),
        }
    }

    /// Sends `self.write` (one command) and reads its reply.
    async fn exchange_one(&mut self) -> RedisResult<Value> {
        self.begin()?;
        self.stream.write_all(&self.write).await?;
        let value = self.receive().await?;
        self.broken = false;
        Ok(value)
    }

    /// One command of the connection's set-up, under the per-command
    /// timeout; its error reply is the error.
    async fn handshake(&mut self, cmd: &Cmd) -> RedisResult<()> {
        let timeout = self.timeout;
        self.command(cmd, timeout).await?.extract_error().map(drop)
    }

    fn begin(&mut self) -> RedisResult<()> {
        if self.broken {
            return Err(RedisError::from(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "redis connection was cut off in the middle of a request",
            )));
        }
        self.broken = true;
        Ok(())
    }

    /// The next reply, read from the socket as far as needed.
    async fn receive(&mut self) -> RedisResult<Value> {
        loop {
            if !self.read.is_empty() {
                if let Some(value) = decode(&mut self.read)? {
                    return Ok(value);
                }
            }
            // Doubling what is asked for keeps a long reply, decoded from
            // its start after each read, to a few decoding passes.
            self.read.reserve(READ_CHUNK.max(self.read.len()));
            if self.stream.read_buf(&mut self.read).await? == 0 {
                return Err(RedisError::from(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "redis closed the connection",
                )));
            }
        }
    }

    async fn command(&mut self, cmd: &Cmd, timeout: Option<Duration>) -> RedisResult<Value> {
        self.write.clear();
        cmd.write_packed_command(&mut self.write);
        match timeout {
            None => self.exchange_one().await,
            Some(limit) => tokio::time::timeout(limit, self.exchange_one())
                .await
                .unwrap_or_else(|_| Err(timed_out())),
        }
    }

    async fn pipeline(
        &mut self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
        timeout: Option<Duration>,
    ) -> RedisResult<Vec<Value>> {
        self.write = pipeline.get_packed_pipeline();
        match timeout {
            None => self.exchange(offset, count).await,
            Some(limit) => tokio::time::timeout(limit, self.exchange(offset, count))
                .await
                .unwrap_or_else(|_| Err(timed_out())),
        }
    }
}

/// Takes one whole RESP2 reply off the front of `buf`; `None` while its
/// last bytes have not arrived (nothing is taken then).
pub(crate) fn decode(buf: &mut BytesMut) -> RedisResult<Option<Value>> {
    let mut at = 0;
    let value = reply(buf, &mut at)?;
    if value.is_some() {
        buf.advance(at);
    }
    Ok(value)
}

/// The reply starting at `*at`, moving `*at` past it.
fn reply(buf: &[u8], at: &mut usize) -> RedisResult<Option<Value>> {
    let start = *at;
    let Some(line) = line(buf, at) else {
        return Ok(None);
    };
    let Some((&kind, rest)) = line.split_first() else {
        return Err(garbage("an empty line"));
    };
    Ok(Some(match kind {
        b'+' if rest == b"OK" => Value::Okay,
        b'+' => Value::SimpleString(
            std::str::from_utf8(rest)
                .map_err(|_| garbage("a status that is not UTF-8"))?
                .to_owned(),
        ),
        b'-' => redis::parse_redis_value(&buf[start..*at])?,
        b':' => Value::Int(number(rest)?),
        b'$' => {
            let Ok(len) = usize::try_from(number(rest)?) else {
                return Ok(Some(Value::Nil));
            };
            let end = *at + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(garbage("a bulk string longer than announced"));
            }
            let value = Value::BulkString(buf[*at..end].to_vec());
            *at = end + 2;
            value
        }
        b'*' => {
            let Ok(len) = usize::try_from(number(rest)?) else {
                return Ok(Some(Value::Nil));
            };
            // Every element takes at least 3 bytes: a length no buffer
            // could hold is not allocated for.
            let mut items = Vec::with_capacity(len.min(buf.len() / 3));
            for _ in 0..len {
                match reply(buf, at)? {
                    Some(item) => items.push(item),
                    None => return Ok(None),
                }
            }
            Value::Array(items)
        }
        _ => return Err(garbage("a reply type other than RESP2's")),
    }))
}

/// The line starting at `*at`, without its CRLF, moving `*at` past it.
fn line<'a>(buf: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
    let from = *at;
    let len = buf[from..].windows(2).position(|w| w == b"\r\n")?;
    *at = from + len + 2;
    Some(&buf[from..from + len])
}

fn number(digits: &[u8]) -> RedisResult<i64> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| garbage("a length or integer that is not a number"))
}

/// A reply that is not RESP2: the connection cannot be trusted further
/// (it stays marked as mid-request, so it is never used again).
fn garbage(what: &str) -> RedisError {
    RedisError::from(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("redis sent {what}"),
    ))
}

fn timed_out() -> RedisError {
    RedisError::from(io::Error::new(
        io::ErrorKind::TimedOut,
        "no reply from redis in time",
    ))
}

impl Conn {
    /// Sends `cmd`; `own_timeout` says whether a direct connection bounds
    /// it with its per-command timeout.
    fn send<'a>(&'a mut self, cmd: &'a Cmd, own_timeout: bool) -> RedisFuture<'a, Value> {
        match self {
            Conn::Direct(direct) => {
                let timeout = direct.timeout.filter(|_| own_timeout);
                Box::pin(direct.command(cmd, timeout))
            }
            Conn::Multiplexed(conn) => conn.req_packed_command(cmd),
        }
    }

    /// Sends `pipeline`, as [`Conn::send`] sends a command.
    fn send_all<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
        own_timeout: bool,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Direct(direct) => {
                let timeout = direct.timeout.filter(|_| own_timeout);
                Box::pin(direct.pipeline(pipeline, offset, count, timeout))
            }
            Conn::Multiplexed(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.send(cmd, true)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.send_all(pipeline, offset, count, true)
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Direct(direct) => direct.db,
            Conn::Multiplexed(conn) => conn.get_db(),
        }
    }
}

/// A connection used under an operation's own deadline: a direct
/// connection sets no timer per command (the operation's one timer bounds
/// them all); a multiplexed one keeps its response timeout.
pub(crate) struct WithinDeadline<'a>(&'a mut Conn);

impl ConnectionLike for WithinDeadline<'_> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.0.send(cmd, false)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.0.send_all(pipeline, offset, count, false)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use deadpool_redis::redis::{self, Value};

    use super::decode;

    /// Every reply decodes as redis-rs' own parser decodes it, also when
    /// its bytes arrive one at a time.
    #[test]
    fn replies_decode_as_redis_rs_decodes_them() {
        let replies: &[&[u8]] = &[
            b"+OK\r\n",
            b"+QUEUED\r\n",
            b"-ERR unknown command 'FOO'\r\n",
            b"-NOSCRIPT No matching script. Please use EVAL.\r\n",
            b":0\r\n",
            b":-2\r\n",
            b":9223372036854775807\r\n",
            b"$-1\r\n",
            b"$0\r\n\r\n",
            b"$5\r\nhe\r\no\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*3\r\n$1\r\nv\r\n:-1\r\n*2\r\n+OK\r\n$-1\r\n",
            b"*2\r\n-EXECABORT Transaction discarded\r\n:1\r\n",
        ];
        for &bytes in replies {
            let theirs = redis::parse_redis_value(bytes).expect("redis-rs parses it");
            let mut buf = BytesMut::from(bytes);
            assert_eq!(decode(&mut buf).expect("decodes"), Some(theirs.clone()));
            assert!(buf.is_empty(), "{bytes:?} left {buf:?}");
            // Byte by byte: nothing until the last one, nothing taken early.
            let mut buf = BytesMut::new();
            for (i, &b) in bytes.iter().enumerate() {
                buf.extend_from_slice(&[b]);
                let got = decode(&mut buf).expect("decodes");
                if i + 1 < bytes.len() {
                    assert_eq!(got, None, "{bytes:?} after {} bytes", i + 1);
                    assert_eq!(buf.len(), i + 1);
                } else {
                    assert_eq!(got, Some(theirs.clone()));
                }
            }
        }
        // Two replies in one read come out one after the other.
        let mut buf = BytesMut::from(&b":1\r\n$1\r\nx\r\n"[..]);
        assert_eq!(decode(&mut buf).unwrap(), Some(Value::Int(1)));
        assert_eq!(
            decode(&mut buf).unwrap(),
            Some(Value::BulkString(b"x".to_vec()))
        );
        assert_eq!(decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn garbage_is_an_error_that_names_it() {
        for bytes in [
            &b"?what\r\n"[..],
            b":12x\r\n",
            b"$2\r\nabc\r\n",
            b"%1\r\n+a\r\n+b\r\n",
        ] {
            let err = decode(&mut BytesMut::from(bytes)).expect_err("garbage");
            assert!(err.is_io_error(), "{err}");
            assert!(err.to_string().contains("redis sent"), "{err}");
        }
    }
}
