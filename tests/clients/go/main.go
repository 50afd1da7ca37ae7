// Command lk-data joins a LiveKit room with LiveKit's Go SDK (pion WebRTC, as the `lk` CLI does),
// publishes data packets on a topic, then leaves when told to.
//
// It stands in for `lk room join --publish-data`, whose module the Go proxy here does not serve.
// tests/test_foreign_clients.py runs it:
//
//	LIVEKIT_URL=ws://... LIVEKIT_TOKEN=<jwt> lk-data -topic T -payload P [-count N] [-lossy]
//
// The caller paces it through stdin and stdout, one JSON line per step on stdout:
//
//  1. joined: {"joined": true, "identity": ..., "sid": ...}; then it waits for a line on stdin
//     (the caller can first check that the room saw it join);
//  2. sent: {"sent": N} once every packet is handed to the data channel; then it waits for its
//     stdin to close (or another line) before it disconnects, so it never leaves while packets
//     are still in flight.
//
// With stdin at its end (e.g. </dev/null) it goes straight through.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	lksdk "github.com/livekit/server-sdk-go/v2"
)

func main() {
	topic := flag.String("topic", "", "data packet topic")
	payload := flag.String("payload", "", "payload of each packet (packet i>0 gets \" #i\" appended)")
	count := flag.Int("count", 1, "how many packets")
	lossy := flag.Bool("lossy", false, "send on the lossy channel instead of the reliable one")
	timeout := flag.Duration("timeout", 20*time.Second, "connect timeout")
	flag.Parse()

	url, token := os.Getenv("LIVEKIT_URL"), os.Getenv("LIVEKIT_TOKEN")
	if url == "" || token == "" {
		fail("set LIVEKIT_URL and LIVEKIT_TOKEN (a join token for the room) in the environment")
	}
	room, err := lksdk.ConnectToRoomWithToken(url, token, &lksdk.RoomCallback{},
		lksdk.WithAutoSubscribe(false), lksdk.WithConnectTimeout(*timeout))
	if err != nil {
		fail("could not join %s: %v", url, err)
	}
	defer room.Disconnect()

	lp := room.LocalParticipant
	say(map[string]any{"joined": true, "identity": lp.Identity(), "sid": lp.SID()})
	stdin := bufio.NewReader(os.Stdin)
	_, _ = stdin.ReadString('\n')

	for i := 0; i < *count; i++ {
		body := *payload
		if i > 0 {
			body = fmt.Sprintf("%s #%d", body, i)
		}
		opts := []lksdk.DataPublishOption{lksdk.WithDataPublishReliable(!*lossy)}
		if *topic != "" {
			opts = append(opts, lksdk.WithDataPublishTopic(*topic))
		}
		if err := lp.PublishDataPacket(lksdk.UserData([]byte(body)), opts...); err != nil {
			fail("could not publish packet %d: %v", i, err)
		}
	}
	say(map[string]any{"sent": *count})

	// stay in the room until the caller has seen the packets arrive
	_, _ = stdin.ReadString('\n')
}

func say(step map[string]any) {
	out, _ := json.Marshal(step)
	fmt.Println(string(out))
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "lk-data: "+format+"\n", args...)
	os.Exit(1)
}
