"""daemon.clients' uses of aiokafka's private API, against the real broker: these fail first when
an aiokafka upgrade changes what they rely on."""

from __future__ import annotations

from aiokafka.admin import NewTopic
from aiokafka.protocol.metadata import MetadataRequest

from daemon import clients
from tests import kafkatools


async def test_partitions_of_fetches_the_metadata_of_a_topic_the_client_never_asked_about(kafka_bootstrap):
    topic = kafkatools.unique("clients")
    await kafkatools.create_topics(kafka_bootstrap, {topic: 3})
    consumer = clients.consumer(kafka_bootstrap)
    await consumer.start()
    try:
        assert consumer.partitions_for_topic(topic) is None  # not subscribed: no metadata held yet
        assert await clients.partitions_of(consumer, topic) == {0, 1, 2}
    finally:
        await consumer.stop()


async def test_refresh_metadata_shows_a_topic_created_after_the_client_started(kafka_bootstrap):
    first, later = kafkatools.unique("clients"), kafkatools.unique("clients")
    await kafkatools.create_topics(kafka_bootstrap, {first: 1})
    consumer = clients.consumer(kafka_bootstrap, first)  # metadata is kept for the subscribed topic
    await consumer.start()
    admin = clients.admin(kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(later, 2, 1)])
        response = await clients.send_request(admin, MetadataRequest([later], allow_auto_topic_creation=False))
        assert [t[1] for t in response.topics] == [later]
        consumer.subscribe([first, later])

        async def both_known() -> bool:
            await clients.refresh_metadata(consumer)
            return consumer.partitions_for_topic(later) == {0, 1}

        await kafkatools.wait_for(both_known, timeout=30, what=f"metadata of {later}")
    finally:
        await admin.close()
        await consumer.stop()
