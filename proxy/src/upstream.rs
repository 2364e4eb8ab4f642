//! sluice's own connection to the workload: from the bypass source, so the
//! interception rules let it through instead of catching it again.

use std::io;
use std::net::SocketAddr;

use tokio_uring::net::TcpStream;

use crate::{linux, uring};

pub async fn connect(destination: SocketAddr) -> io::Result<TcpStream> {
    let socket = linux::bypass_socket(destination)?;
    let connected = uring::connect(socket, destination.into()).await?;
    Ok(TcpStream::from_std(connected.into()))
}
