// A minimal assistant-ui page for the browser check: the README's MyRuntimeProvider with its
// get_weather toolkit, and a thread built from primitives.
import { ComposerPrimitive, MessagePrimitive, ThreadPrimitive } from "@assistant-ui/react";
import { createRoot } from "react-dom/client";
import { MyRuntimeProvider } from "./MyRuntimeProvider.tsx";

const query = new URLSearchParams(window.location.search);

const UserMessage = () => (
  <MessagePrimitive.Root className="user">
    <MessagePrimitive.Parts />
  </MessagePrimitive.Root>
);

const AssistantMessage = () => (
  <MessagePrimitive.Root className="assistant">
    <MessagePrimitive.Parts />
  </MessagePrimitive.Root>
);

function App() {
  return (
    <MyRuntimeProvider
      api={query.get("api")}
      protocol={query.get("protocol") ?? "data-stream"}
      onError={(error) => (window.lastError = [String(error)])}
    >
      <ThreadPrimitive.Root>
        <ThreadPrimitive.Viewport>
          <ThreadPrimitive.Messages components={{ UserMessage, AssistantMessage }} />
        </ThreadPrimitive.Viewport>
        <ComposerPrimitive.Root>
          <ComposerPrimitive.Input placeholder="Write a message" />
          <ComposerPrimitive.Send>Send</ComposerPrimitive.Send>
          <ComposerPrimitive.Cancel>Stop</ComposerPrimitive.Cancel>
        </ComposerPrimitive.Root>
      </ThreadPrimitive.Root>
    </MyRuntimeProvider>
  );
}

createRoot(document.getElementById("root")).render(<App />);
