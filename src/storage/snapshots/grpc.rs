//! containerd's `containerd.services.snapshots.v1.Snapshots` gRPC service over a unix socket:
//! the proxy-snapshotter side (server) and a small client for tools and tests.
//!
//! Written without generated code: a [`tonic::server::NamedService`] whose `call` routes the
//! method path to [`tonic::server::Grpc`] with our own prost [`Codec`](tonic::codec::Codec).
//! The namespace arrives in the `containerd-namespace` header; the driver keys every snapshot
//! by it, so namespaces never collide. Driver calls block, so they run on tokio's blocking pool.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::{Body as HttpBody, BoxFuture, Service, http};
use tonic::{Code, Request, Response, Status};

use super::proto::{self, SERVICE};
use super::{Error, ErrorKind, Info, Kind, Snapshotter};

/// The gRPC metadata key containerd puts the namespace in.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";

/// The namespace of requests that carry no `containerd-namespace` header.
pub const DEFAULT_NAMESPACE: &str = "default";

/// How many snapshots one `List` response message carries.
const LIST_BATCH: usize = 100;

// ---------------------------------------------------------------------------------------------
// Codec

/// Protobuf codec for message types `E` (sent) and `D` (received).
pub struct ProstCodec<E, D>(PhantomData<fn() -> (E, D)>);

impl<E, D> Default for ProstCodec<E, D> {
    fn default() -> Self {
        ProstCodec(PhantomData)
    }
}

pub struct ProstEncoder<E>(PhantomData<fn() -> E>);
pub struct ProstDecoder<D>(PhantomData<fn() -> D>);

impl<E, D> Codec for ProstCodec<E, D>
where
    E: prost::Message + Send + 'static,
    D: prost::Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = ProstEncoder<E>;
    type Decoder = ProstDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder(PhantomData)
    }
}

impl<E: prost::Message> Encoder for ProstEncoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encode: {e}")))
    }
}

impl<D: prost::Message + Default> Decoder for ProstDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        D::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("decode: {e}")))
    }
}

// ---------------------------------------------------------------------------------------------
// Conversions

/// containerd's errdefs → gRPC codes.
pub fn status(e: Error) -> Status {
    let code = match e.kind() {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::Internal => Code::Unknown,
    };
    Status::new(code, e.to_string())
}

/// gRPC status → driver error, for the client side.
pub fn error_from_status(s: &Status) -> Error {
    let msg = s.message().to_owned();
    match s.code() {
        Code::NotFound => Error::NotFound(msg),
        Code::AlreadyExists => Error::AlreadyExists(msg),
        Code::FailedPrecondition => Error::FailedPrecondition(msg),
        Code::InvalidArgument => Error::InvalidArgument(msg),
        _ => Error::io(format!("gRPC {:?}", s.code()), io::Error::other(msg)),
    }
}

fn timestamp(t: SystemTime) -> proto::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    proto::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn system_time(t: Option<proto::Timestamp>) -> SystemTime {
    let t = t.unwrap_or_default();
    UNIX_EPOCH
        + Duration::new(
            t.seconds.max(0) as u64,
            t.nanos.clamp(0, 999_999_999) as u32,
        )
}

pub fn info_to_proto(i: Info) -> proto::Info {
    proto::Info {
        name: i.name,
        parent: i.parent.unwrap_or_default(),
        kind: match i.kind {
            Kind::View => proto::Kind::View,
            Kind::Active => proto::Kind::Active,
            Kind::Committed => proto::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(i.created)),
        updated_at: Some(timestamp(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

pub fn info_from_proto(i: proto::Info) -> Info {
    Info {
        name: i.name,
        parent: Some(i.parent).filter(|p| !p.is_empty()),
        kind: match proto::Kind::try_from(i.kind) {
            Ok(proto::Kind::View) => Kind::View,
            Ok(proto::Kind::Committed) => Kind::Committed,
            _ => Kind::Active,
        },
        labels: i.labels.into_iter().collect(),
        created: system_time(i.created_at),
        updated: system_time(i.updated_at),
    }
}

fn mounts_to_proto(m: Vec<super::Mount>) -> Vec<proto::Mount> {
    m.into_iter()
        .map(|m| proto::Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn mounts_from_proto(m: Vec<proto::Mount>) -> Vec<super::Mount> {
    m.into_iter()
        .map(|m| super::Mount {
            kind: m.r#type,
            source: m.source,
            options: m.options,
        })
        .collect()
}

fn labels(l: HashMap<String, String>) -> BTreeMap<String, String> {
    l.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// Server

/// The service: one [`Snapshotter`] shared by all connections.
#[derive(Clone)]
pub struct SnapshotsServer {
    snapshotter: Arc<Snapshotter>,
}

impl SnapshotsServer {
    pub fn new(snapshotter: Arc<Snapshotter>) -> Self {
        SnapshotsServer { snapshotter }
    }
}

impl tonic::server::NamedService for SnapshotsServer {
    const NAME: &'static str = SERVICE;
}

/// A tower service that handles exactly one request with `F`.
struct Once<F, M1, M2>(Option<F>, PhantomData<fn(M1) -> M2>);

impl<F, Fut, M1, M2> Service<Request<M1>> for Once<F, M1, M2>
where
    F: FnOnce(Request<M1>) -> Fut,
    Fut: Future<Output = Result<Response<M2>, Status>>,
{
    type Response = Response<M2>;
    type Error = Status;
    type Future = Fut;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<M1>) -> Fut {
        (self.0.take().expect("a Once service is called once"))(req)
    }
}

type HttpResponse = http::Response<tonic::body::Body>;

fn namespace<T>(req: &Request<T>) -> Result<String, Status> {
    // containerd 1.x does not forward the namespace to proxy snapshotters (its keys already
    // start with `NAMESPACE/ID/`); those requests share [`DEFAULT_NAMESPACE`].
    match req.metadata().get(NAMESPACE_HEADER) {
        None => Ok(DEFAULT_NAMESPACE.to_owned()),
        Some(v) => match v.to_str() {
            Ok("") => Ok(DEFAULT_NAMESPACE.to_owned()),
            Ok(ns) => Ok(ns.to_owned()),
            Err(_) => Err(Status::invalid_argument("namespace is not ASCII")),
        },
    }
}

/// Runs a blocking driver call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("driver task failed: {e}")))?
        .map_err(status)
}

fn unary<B, M1, M2, F, Fut>(req: http::Request<B>, f: F) -> BoxFuture<HttpResponse, Infallible>
where
    B: HttpBody + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
    M1: prost::Message + Default + Send + 'static,
    M2: prost::Message + Send + 'static,
    F: FnOnce(Request<M1>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Response<M2>, Status>> + Send + 'static,
{
    Box::pin(async move {
        let mut grpc = tonic::server::Grpc::new(ProstCodec::<M2, M1>::default());
        Ok(grpc.unary(Once(Some(f), PhantomData), req).await)
    })
}

impl<B> Service<http::Request<B>> for SnapshotsServer
where
    B: HttpBody + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = BoxFuture<HttpResponse, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let s = self.snapshotter.clone();
        let method = req
            .uri()
            .path()
            .strip_prefix("/")
            .and_then(|p| p.strip_prefix(SERVICE))
            .and_then(|p| p.strip_prefix("/"))
            .unwrap_or("")
            .to_owned();
        match method.as_str() {
            "Prepare" | "View" => {
                let view = method == "View";
                unary(
                    req,
                    move |r: Request<proto::PrepareSnapshotRequest>| async move {
                        let ns = namespace(&r)?;
                        let r = r.into_inner();
                        let mounts = blocking(move || {
                            let parent = Some(r.parent.as_str()).filter(|p| !p.is_empty());
                            if view {
                                s.view(&ns, &r.key, parent, labels(r.labels))
                            } else {
                                s.prepare(&ns, &r.key, parent, labels(r.labels))
                            }
                        })
                        .await?;
                        Ok(Response::new(proto::PrepareSnapshotResponse {
                            mounts: mounts_to_proto(mounts),
                        }))
                    },
                )
            }
            "Mounts" => unary(req, move |r: Request<proto::MountsRequest>| async move {
                let ns = namespace(&r)?;
                let key = r.into_inner().key;
                let mounts = blocking(move || s.mounts(&ns, &key)).await?;
                Ok(Response::new(proto::MountsResponse {
                    mounts: mounts_to_proto(mounts),
                }))
            }),
            "Commit" => unary(
                req,
                move |r: Request<proto::CommitSnapshotRequest>| async move {
                    let ns = namespace(&r)?;
                    let r = r.into_inner();
                    blocking(move || s.commit(&ns, &r.name, &r.key, labels(r.labels))).await?;
                    Ok(Response::new(proto::Empty {}))
                },
            ),
            "Remove" => unary(
                req,
                move |r: Request<proto::RemoveSnapshotRequest>| async move {
                    let ns = namespace(&r)?;
                    let key = r.into_inner().key;
                    blocking(move || s.remove(&ns, &key)).await?;
                    Ok(Response::new(proto::Empty {}))
                },
            ),
            "Stat" => unary(
                req,
                move |r: Request<proto::StatSnapshotRequest>| async move {
                    let ns = namespace(&r)?;
                    let key = r.into_inner().key;
                    let info = blocking(move || s.stat(&ns, &key)).await?;
                    Ok(Response::new(proto::StatSnapshotResponse {
                        info: Some(info_to_proto(info)),
                    }))
                },
            ),
            "Update" => unary(
                req,
                move |r: Request<proto::UpdateSnapshotRequest>| async move {
                    let ns = namespace(&r)?;
                    let r = r.into_inner();
                    let info = r
                        .info
                        .ok_or_else(|| Status::invalid_argument("info is required"))?;
                    let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
                    let info = info_from_proto(info);
                    let updated = blocking(move || s.update(&ns, &info, &paths)).await?;
                    Ok(Response::new(proto::UpdateSnapshotResponse {
                        info: Some(info_to_proto(updated)),
                    }))
                },
            ),
            "Usage" => unary(req, move |r: Request<proto::UsageRequest>| async move {
                let ns = namespace(&r)?;
                let key = r.into_inner().key;
                let u = blocking(move || s.usage(&ns, &key)).await?;
                Ok(Response::new(proto::UsageResponse {
                    size: u.size,
                    inodes: u.inodes,
                }))
            }),
            "Cleanup" => unary(req, move |_r: Request<proto::CleanupRequest>| async move {
                blocking(move || s.cleanup()).await?;
                Ok(Response::new(proto::Empty {}))
            }),
            "List" => Box::pin(async move {
                let handler = Once(
                    Some(move |r: Request<proto::ListSnapshotsRequest>| async move {
                        let ns = namespace(&r)?;
                        let filters = r.into_inner().filters;
                        let infos = blocking(move || s.walk(&ns, &filters)).await?;
                        let mut batches = Vec::new();
                        let mut infos = infos.into_iter().map(info_to_proto).peekable();
                        while infos.peek().is_some() {
                            batches.push(Ok(proto::ListSnapshotsResponse {
                                info: infos.by_ref().take(LIST_BATCH).collect(),
                            }));
                        }
                        Ok(Response::new(tokio_stream::iter(batches)))
                    }),
                    PhantomData,
                );
                let mut grpc = tonic::server::Grpc::new(ProstCodec::<
                    proto::ListSnapshotsResponse,
                    proto::ListSnapshotsRequest,
                >::default());
                Ok(grpc.server_streaming(handler, req).await)
            }),
            _ => {
                let status = Status::unimplemented(format!("unknown method {}", req.uri().path()));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// Why [`serve`] stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}: another server is listening on it")]
    InUse(PathBuf),
    #[error("{0}: exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Replaces a socket left by a crashed server; refuses one that still answers.
fn clear_stale_socket(path: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::FileTypeExt;
    let io_err = |source| ServeError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(e)),
        Ok(m) if !m.file_type().is_socket() => Err(ServeError::NotASocket(path.to_owned())),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(ServeError::InUse(path.to_owned())),
            Err(_) => std::fs::remove_file(path).map_err(io_err),
        },
    }
}

/// Serves `snapshotter` on the unix socket `path` until `shutdown` resolves, then stops
/// accepting, lets running calls finish, removes the socket and closes the driver.
pub async fn serve(
    snapshotter: Arc<Snapshotter>,
    path: &Path,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    clear_stale_socket(path)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::Io {
            path: dir.to_owned(),
            source,
        })?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|source| ServeError::Io {
        path: path.to_owned(),
        source,
    })?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let result = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(snapshotter.clone()))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(path);
    let _ = snapshotter.close();
    result.map_err(ServeError::from)
}

// ---------------------------------------------------------------------------------------------
// Client

/// A client of the snapshots service (ours or containerd's own), bound to one namespace.
#[derive(Clone)]
pub struct Client {
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
    namespace: String,
    snapshotter: String,
}

impl Client {
    /// Connects to the unix socket `path`.
    pub async fn connect(path: &Path, namespace: &str) -> Result<Client, tonic::transport::Error> {
        let channel = tonic::transport::Endpoint::from_shared(format!("unix:{}", path.display()))?
            .connect()
            .await?;
        Ok(Client {
            grpc: tonic::client::Grpc::new(channel),
            namespace: namespace.to_owned(),
            snapshotter: String::new(),
        })
    }

    /// The same connection in another namespace.
    pub fn with_namespace(&self, namespace: &str) -> Client {
        Client {
            namespace: namespace.to_owned(),
            ..self.clone()
        }
    }

    /// Sends the namespace header (none for an empty namespace).
    fn add_namespace<T>(&self, req: &mut Request<T>) -> Result<(), Status> {
        if !self.namespace.is_empty() {
            let v = self
                .namespace
                .parse()
                .map_err(|_| Status::invalid_argument("namespace is not ASCII"))?;
            req.metadata_mut().insert(NAMESPACE_HEADER, v);
        }
        Ok(())
    }

    async fn call<M1, M2>(&mut self, method: &'static str, msg: M1) -> Result<M2, Status>
    where
        M1: prost::Message + Send + Sync + 'static,
        M2: prost::Message + Default + Send + Sync + 'static,
    {
        let mut req = Request::new(msg);
        self.add_namespace(&mut req)?;
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let path =
            PathAndQuery::from_maybe_shared(format!("/{SERVICE}/{method}")).expect("a valid path");
        Ok(self
            .grpc
            .unary(req, path, ProstCodec::<M1, M2>::default())
            .await?
            .into_inner())
    }

    pub async fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<super::Mount>, Status> {
        self.create("Prepare", key, parent, labels).await
    }

    pub async fn view(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<super::Mount>, Status> {
        self.create("View", key, parent, labels).await
    }

    async fn create(
        &mut self,
        method: &'static str,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<super::Mount>, Status> {
        let r: proto::PrepareSnapshotResponse = self
            .call(
                method,
                proto::PrepareSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    key: key.into(),
                    parent: parent.into(),
                    labels,
                },
            )
            .await?;
        Ok(mounts_from_proto(r.mounts))
    }

    fn key_req(&self, key: &str) -> proto::KeyRequest {
        proto::KeyRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.into(),
        }
    }

    pub async fn mounts(&mut self, key: &str) -> Result<Vec<super::Mount>, Status> {
        let req = self.key_req(key);
        let r: proto::MountsResponse = self.call("Mounts", req).await?;
        Ok(mounts_from_proto(r.mounts))
    }

    pub async fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Status> {
        let req = proto::CommitSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            name: name.into(),
            key: key.into(),
            labels,
        };
        let _: proto::Empty = self.call("Commit", req).await?;
        Ok(())
    }

    pub async fn remove(&mut self, key: &str) -> Result<(), Status> {
        let req = self.key_req(key);
        let _: proto::Empty = self.call("Remove", req).await?;
        Ok(())
    }

    pub async fn stat(&mut self, key: &str) -> Result<Info, Status> {
        let req = self.key_req(key);
        let r: proto::StatSnapshotResponse = self.call("Stat", req).await?;
        Ok(info_from_proto(r.info.unwrap_or_default()))
    }

    pub async fn update(&mut self, info: Info, paths: &[&str]) -> Result<Info, Status> {
        let req = proto::UpdateSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            info: Some(info_to_proto(info)),
            update_mask: Some(proto::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
        };
        let r: proto::UpdateSnapshotResponse = self.call("Update", req).await?;
        Ok(info_from_proto(r.info.unwrap_or_default()))
    }

    pub async fn usage(&mut self, key: &str) -> Result<super::Usage, Status> {
        let req = self.key_req(key);
        let r: proto::UsageResponse = self.call("Usage", req).await?;
        Ok(super::Usage {
            size: r.size,
            inodes: r.inodes,
        })
    }

    pub async fn cleanup(&mut self) -> Result<(), Status> {
        let req = proto::CleanupRequest {
            snapshotter: self.snapshotter.clone(),
        };
        let _: proto::Empty = self.call("Cleanup", req).await?;
        Ok(())
    }

    /// `List`: returns the snapshots and how many stream messages carried them.
    pub async fn list(&mut self, filters: &[&str]) -> Result<(Vec<Info>, usize), Status> {
        let mut req = Request::new(proto::ListSnapshotsRequest {
            snapshotter: self.snapshotter.clone(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        });
        self.add_namespace(&mut req)?;
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let path =
            PathAndQuery::from_maybe_shared(format!("/{SERVICE}/List")).expect("a valid path");
        let mut stream = self
            .grpc
            .server_streaming(
                req,
                path,
                ProstCodec::<proto::ListSnapshotsRequest, proto::ListSnapshotsResponse>::default(),
            )
            .await?
            .into_inner();
        let mut out = Vec::new();
        let mut messages = 0;
        while let Some(batch) = stream.message().await? {
            messages += 1;
            out.extend(batch.info.into_iter().map(info_from_proto));
        }
        Ok((out, messages))
    }
}
