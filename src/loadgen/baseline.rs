//! The transport-only baseline: an ADS server that does no translation at
//! all. Every stream waits for its first request; on the trigger, each is
//! written the same already-built responses (those one proxy received for
//! the change from meshd). Fan-out time over the same number of streams is
//! the floor meshd's own fan-out is compared with.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

struct Replay {
    responses: Arc<Vec<DiscoveryResponse>>,
    trigger: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Replay {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let responses = self.responses.clone();
        let mut trigger = self.trigger.clone();
        tokio::spawn(async move {
            if requests.message().await.ok().flatten().is_none() {
                return;
            }
            if trigger.wait_for(|t| *t).await.is_err() {
                return;
            }
            for r in responses.iter() {
                if tx.send(Ok(r.clone())).await.is_err() {
                    return;
                }
            }
            // Drain the ACKs until the client goes.
            while let Ok(Some(_)) = requests.message().await {}
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "the baseline replays state-of-the-world responses",
        ))
    }
}

/// Fans `responses` out to `clients` streams at once; returns the time
/// from the trigger until the last stream had received all of them.
pub async fn fan_out(responses: Vec<DiscoveryResponse>, clients: usize) -> anyhow::Result<Duration> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (fire, trigger) = watch::channel(false);
    let count = responses.len();
    let server = AggregatedDiscoveryServiceServer::new(Replay {
        responses: Arc::new(responses),
        trigger,
    })
    .max_encoding_message_size(usize::MAX);
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    let (done_tx, mut done_rx) = mpsc::channel::<Instant>(clients.max(1));
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(clients.max(1));
    let mut streams = Vec::new();
    for _ in 0..clients {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let done = done_tx.clone();
        let ready = ready_tx.clone();
        streams.push(tokio::spawn(async move {
            let (tx, rx) = mpsc::channel::<DiscoveryRequest>(16);
            let _ = tx.send(DiscoveryRequest::default()).await;
            let mut client =
                AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(usize::MAX);
            let Ok(resp) = client.stream_aggregated_resources(ReceiverStream::new(rx)).await else {
                return;
            };
            let mut stream = resp.into_inner();
            let _ = ready.send(()).await;
            let mut got = 0;
            while let Ok(Some(r)) = stream.message().await {
                let _ = tx
                    .send(DiscoveryRequest {
                        type_url: r.type_url.clone(),
                        version_info: r.version_info.clone(),
                        response_nonce: r.nonce.clone(),
                        ..Default::default()
                    })
                    .await;
                got += 1;
                if got == count {
                    let _ = done.send(Instant::now()).await;
                    break;
                }
            }
        }));
    }
    for _ in 0..clients {
        ready_rx.recv().await;
    }
    // Streams that have not reached their wait yet see the trigger set.
    let start = Instant::now();
    let _ = fire.send(true);
    let mut last = start;
    for _ in 0..clients {
        match tokio::time::timeout(Duration::from_secs(60), done_rx.recv()).await {
            Ok(Some(t)) => last = last.max(t),
            _ => anyhow::bail!("the baseline fan-out did not finish"),
        }
    }
    for s in streams {
        s.abort();
    }
    serving.abort();
    Ok(last - start)
}
