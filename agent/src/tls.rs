//! TLS plumbing shared by the HTTP clients and servers.

use std::sync::Once;

/// Install ring as the process-wide rustls crypto provider (once).
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only when another provider was installed first, which is
        // equally fine for us.
        if rustls::crypto::ring::default_provider().install_default().is_err() {
            tracing::debug!("a rustls crypto provider was already installed");
        }
    });
}
