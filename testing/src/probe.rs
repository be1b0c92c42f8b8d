//! Readiness probes: each asks the broker something in its own protocol and
//! accepts only a real answer (an open port is not readiness: RabbitMQ's
//! opens at the end of boot, a container's port forwarder accepts at once).

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use crate::Kind;

/// `Ok` once the broker of `kind` on `127.0.0.1:port` answers.
pub(crate) async fn answers(kind: Kind, port: u16) -> Result<(), String> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let result = match kind {
        Kind::Nats => nats(stream).await,
        Kind::RabbitMq => amqp(stream).await,
        Kind::Kafka => kafka(stream).await,
        Kind::Sqs => http(stream, port).await,
    };
    result.map_err(|e| e.to_string())
}

type Probe = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A JetStream API request (`$JS.API.INFO`) answered without an error.
async fn nats(stream: TcpStream) -> Probe {
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    if !line.starts_with("INFO ") {
        return Err(format!("expected INFO, got {:?}", truncate(&line)).into());
    }
    stream
        .get_mut()
        .write_all(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true}\r\n\
              SUB _sy_ready 1\r\nPUB $JS.API.INFO _sy_ready 0\r\n\r\n",
        )
        .await?;
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            return Err("the server closed the connection".into());
        }
        if line.starts_with("PING") {
            stream.get_mut().write_all(b"PONG\r\n").await?;
        } else if line.starts_with("-ERR") {
            return Err(format!("server error: {}", truncate(&line)).into());
        } else if let Some(rest) = line.strip_prefix("MSG _sy_ready 1 ") {
            let len: usize = rest.trim().parse()?;
            let mut body = vec![0; len + 2];
            stream.read_exact(&mut body).await?;
            let body = String::from_utf8_lossy(&body[..len]);
            // 503 "no responders" or an API error: JetStream is not up yet.
            if body.contains("\"error\"") || body.is_empty() {
                return Err(format!("JetStream: {}", truncate(&body)).into());
            }
            return Ok(());
        } else if line.starts_with("HMSG _sy_ready") {
            return Err("JetStream does not answer yet (no responders)".into());
        }
    }
}

/// The AMQP 0-9-1 protocol header, answered by a method frame
/// (`connection.start`).
async fn amqp(mut stream: TcpStream) -> Probe {
    stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
    let mut frame = [0u8; 1];
    stream.read_exact(&mut frame).await?;
    if frame[0] == 1 {
        Ok(())
    } else {
        Err(format!("expected an AMQP method frame, got frame type {}", frame[0]).into())
    }
}

/// A Kafka Metadata request (v1, all topics) answered with at least one
/// broker.
async fn kafka(mut stream: TcpStream) -> Probe {
    const CORRELATION: i32 = 0x5359;
    let client = b"switchyard-testing";
    let mut body = Vec::new();
    body.extend_from_slice(&3i16.to_be_bytes()); // api key: Metadata
    body.extend_from_slice(&1i16.to_be_bytes()); // api version 1
    body.extend_from_slice(&CORRELATION.to_be_bytes());
    body.extend_from_slice(&(client.len() as i16).to_be_bytes());
    body.extend_from_slice(client);
    body.extend_from_slice(&(-1i32).to_be_bytes()); // topics: null (all)
    stream.write_all(&(body.len() as i32).to_be_bytes()).await?;
    stream.write_all(&body).await?;
    let len = stream.read_i32().await?;
    if !(8..=64 << 20).contains(&len) {
        return Err(format!("a response of {len} bytes").into());
    }
    let correlation = stream.read_i32().await?;
    if correlation != CORRELATION {
        return Err(format!("correlation id {correlation}, sent {CORRELATION}").into());
    }
    let brokers = stream.read_i32().await?;
    if brokers < 1 {
        return Err("the metadata names no broker yet".into());
    }
    Ok(())
}

/// Any HTTP response from the server (moto answers once it serves).
async fn http(mut stream: TcpStream, port: u16) -> Probe {
    stream
        .write_all(
            format!(
                "GET /moto-api/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    if head.starts_with(b"HTTP/1.") {
        Ok(())
    } else {
        Err(format!("not an HTTP response: {:?}", String::from_utf8_lossy(&head)).into())
    }
}

fn truncate(s: &str) -> &str {
    let s = s.trim_end();
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
