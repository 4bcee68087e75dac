//! Random secrets for tokens and passwords.

use rand::Rng;
use rand::distr::Alphanumeric;

/// A random alphanumeric secret of `len` characters from the OS-seeded
/// thread RNG (about 5.95 bits each: 32 characters give ~190 bits).
pub fn generate(len: usize) -> String {
    rand::rng().sample_iter(Alphanumeric).take(len).map(char::from).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_are_long_and_different() {
        let (a, b) = (super::generate(32), super::generate(32));
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
