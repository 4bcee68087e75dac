//! Polling with a deadline.

use std::fmt::Debug;
use std::time::{Duration, Instant};

/// Call `probe` every `every` until it returns `Ok(value)` or `timeout`
/// passes. On timeout the error names `what` and the last thing `probe`
/// reported, so a failing test says what it saw.
pub fn until<T, E: Debug>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Result<T, E>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(value) => return Ok(value),
            Err(last) => {
                if Instant::now() >= deadline {
                    return Err(format!("timed out after {timeout:?} waiting for {what}; last seen: {last:?}"));
                }
            }
        }
        std::thread::sleep(every);
    }
}

/// The async form of [`until`], for tests running on tokio.
pub async fn until_async<T, E: Debug, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(value) => return Ok(value),
            Err(last) => {
                if Instant::now() >= deadline {
                    return Err(format!("timed out after {timeout:?} waiting for {what}; last seen: {last:?}"));
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_success() {
        let mut n = 0;
        let v = until("n to reach 3", Duration::from_secs(5), Duration::from_millis(1), || {
            n += 1;
            if n >= 3 { Ok(n) } else { Err(n) }
        });
        assert_eq!(v, Ok(3));
    }

    #[test]
    fn timeout_reports_the_last_observation() {
        let err = until::<(), _>("never", Duration::from_millis(20), Duration::from_millis(5), || Err("still 7"))
            .unwrap_err();
        assert!(err.contains("never") && err.contains("still 7"), "{err}");
    }
}
