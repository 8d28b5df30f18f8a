//! The stand-in's TLS mode: a certificate chain and key from PEM files (rustls with ring), and
//! the TLS stream an exchange runs over. The exchange itself does not know whether it speaks
//! TLS: it reads and writes a [`Wire`], and faults still stall, drop or reset the connection.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::http::Wire;

/// The certificate and key a stand-in serves HTTPS with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandInTls {
    /// PEM: the server certificate first, then any intermediates.
    pub cert_file: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// Reads the certificate chain and key into a server configuration. Errors name the file.
pub(crate) fn server_config(tls: &StandInTls) -> io::Result<Arc<rustls::ServerConfig>> {
    let certs = certificates(&tls.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file).map_err(|e| {
        invalid(format!("TLS key file {} holds no usable private key: {e}", tls.key_file.display()))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS settings refused: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            invalid(format!(
                "TLS certificate {} and key {} do not make a usable pair: {e}",
                tls.cert_file.display(),
                tls.key_file.display()
            ))
        })?;
    Ok(Arc::new(config))
}

fn certificates(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| invalid(format!("TLS certificate file {shown} cannot be read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("TLS certificate file {shown} is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(format!("TLS certificate file {shown} holds no certificate")));
    }
    Ok(certs)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// One TLS connection: the handshake happens on the first read.
pub(crate) type TlsStream = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

impl Wire for TlsStream {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }

    fn end_writes(&mut self) {
        self.conn.send_close_notify();
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = self.sock.shutdown(Shutdown::Write);
    }
}
