//! sluice's own connection to the workload: from the bypass source, so the
//! interception rules let it through instead of catching it again.

use std::io;
use std::net::SocketAddr;

use socket2::Socket;
use tokio_uring::net::TcpStream;

use crate::{linux, uring};

/// The socket the connection to `destination` will be made from, with the
/// policy's `mark` (see [`linux::bypass_socket`]); its descriptor can be
/// aborted (the connect timeout) while [`connect`] waits.
pub fn socket(destination: SocketAddr, mark: u32) -> io::Result<Socket> {
    linux::bypass_socket(destination, mark)
}

pub async fn connect(socket: Socket, destination: SocketAddr) -> io::Result<TcpStream> {
    let connected = uring::connect(socket, destination.into()).await?;
    Ok(TcpStream::from_std(connected.into()))
}
