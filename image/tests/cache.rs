//! The download cache against a small HTTP server on 127.0.0.1 that can cut
//! a response mid-body or ignore range requests.

use std::sync::{Arc, Mutex};

use gemin_image::cache::{Cache, FetchError, Request, sha256_bytes};
use gemin_image::progress::Progress;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Serve the whole body.
    Whole,
    /// Cut the first response halfway; honour `Range` afterwards.
    CutThenResume,
    /// Cut the first response halfway; ignore `Range` (always 200, whole body).
    CutThenIgnoreRange,
}

struct Server {
    url: String,
    /// The `Range` header of every request seen (None when absent).
    requests: Arc<Mutex<Vec<Option<String>>>>,
}

async fn serve(body: Vec<u8>, behaviour: Behaviour) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/artifact.bin", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head).to_string();
            let range = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("range: bytes=").map(|r| r.trim().to_string()));
            let first = {
                let mut seen = seen.lock().unwrap();
                seen.push(range.clone());
                seen.len() == 1
            };
            let total = body.len();
            let start = match (behaviour, &range) {
                (Behaviour::CutThenResume, Some(r)) => r.trim_end_matches('-').parse::<usize>().unwrap(),
                _ => 0,
            };
            let header = if start > 0 {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{total}\r\nConnection: close\r\n\r\n",
                    total - start,
                    total - 1
                )
            } else {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n")
            };
            sock.write_all(header.as_bytes()).await.unwrap();
            let cut = first && behaviour != Behaviour::Whole;
            let end = if cut { total / 2 } else { total };
            sock.write_all(&body[start..end]).await.unwrap();
            sock.flush().await.unwrap();
            // Dropping the socket closes the connection (mid-body when cut).
        }
    });
    Server { url, requests }
}

fn body() -> Vec<u8> {
    (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect()
}

fn request(server: &Server, sha256: &str) -> Request {
    Request { name: "artifact".into(), url: server.url.clone(), sha256: sha256.into(), authorization: None }
}

#[tokio::test]
async fn a_cut_download_resumes_with_a_range_request() {
    let body = body();
    let sha = sha256_bytes(&body);
    let server = serve(body.clone(), Behaviour::CutThenResume).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(dir.path()).unwrap();
    let path = cache.fetch(&request(&server, &sha), &Progress::quiet()).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
    let requests = server.requests.lock().unwrap().clone();
    assert_eq!(requests, vec![None, Some(format!("{}-", body.len() / 2))], "the second request resumes at the cut");
    assert_eq!(std::fs::read_dir(dir.path().join("partial")).unwrap().count(), 0, "no partial file left");
}

#[tokio::test]
async fn a_cut_download_restarts_cleanly_when_the_server_ignores_ranges() {
    let body = body();
    let sha = sha256_bytes(&body);
    let server = serve(body.clone(), Behaviour::CutThenIgnoreRange).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(dir.path()).unwrap();
    let path = cache.fetch(&request(&server, &sha), &Progress::quiet()).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body, "the half written first is replaced, not appended to");
    assert_eq!(server.requests.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_checksum_mismatch_is_refused_with_both_digests() {
    let body = body();
    let actual = sha256_bytes(&body);
    let wrong = "0".repeat(64);
    let server = serve(body, Behaviour::Whole).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(dir.path()).unwrap();
    let err = cache.fetch(&request(&server, &wrong), &Progress::quiet()).await.unwrap_err();
    assert!(matches!(err, FetchError::ChecksumMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("expected sha256:{wrong}")), "{text}");
    assert!(text.contains(&format!("got      sha256:{actual}")), "{text}");
    assert!(!cache.has_blob(&wrong) && !cache.has_blob(&actual), "nothing unverified enters the cache");
    assert_eq!(std::fs::read_dir(dir.path().join("partial")).unwrap().count(), 0, "the bad download is discarded");
}

#[tokio::test]
async fn a_cached_digest_needs_no_network() {
    let body = body();
    let sha = sha256_bytes(&body);
    let server = serve(body.clone(), Behaviour::Whole).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(dir.path()).unwrap();
    cache.fetch(&request(&server, &sha), &Progress::quiet()).await.unwrap();
    assert_eq!(server.requests.lock().unwrap().len(), 1);

    // Online or offline, a cached digest is served without a request.
    let again = cache.fetch(&request(&server, &sha), &Progress::quiet()).await.unwrap();
    let offline = Cache::new(dir.path()).unwrap().offline(true);
    let unreachable = Request { url: "http://127.0.0.1:9/never".into(), ..request(&server, &sha) };
    let from_offline = offline.fetch(&unreachable, &Progress::quiet()).await.unwrap();
    assert_eq!(std::fs::read(&from_offline).unwrap(), body);
    assert_eq!(again, from_offline);
    assert_eq!(server.requests.lock().unwrap().len(), 1, "no second request was made");

    // Offline and not cached: a clear error, no attempt.
    let missing = Request { sha256: "1".repeat(64), ..unreachable };
    let err = offline.fetch(&missing, &Progress::quiet()).await.unwrap_err();
    assert!(matches!(err, FetchError::Offline { .. }), "{err}");
}
