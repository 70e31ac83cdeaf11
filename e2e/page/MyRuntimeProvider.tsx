import {
  AssistantRuntimeProvider,
  unstable_createMessageConverter,
  useAssistantTransportRuntime,
  type AssistantTransportConnectionMetadata,
  type AssistantTransportProtocol,
  type ThreadMessageLike,
} from "@assistant-ui/react";
import type { ReactNode } from "react";

// The backend's state: messages whose parts already use ThreadMessageLike's field names.
type Message = { id: string; role: "user" | "assistant" | "system"; parts: ThreadMessageLike["content"] };
type State = { messages: Message[] };

const messages = unstable_createMessageConverter((message: Message) => ({
  id: message.id,
  role: message.role,
  content: message.parts,
}));

const converter = (state: State, { pendingCommands, isSending }: AssistantTransportConnectionMetadata) => {
  // Show the user's message at once, before the backend sends it back in the state.
  const pending = pendingCommands.flatMap((command, index): Message[] =>
    command.type === "add-message"
      ? [{ id: `pending-${index}`, role: "user", parts: [...command.message.parts] }]
      : [],
  );
  return {
    messages: messages.toThreadMessages([...state.messages, ...pending], isSending),
    isRunning: isSending,
  };
};

export function MyRuntimeProvider({
  api = "http://localhost:8002/assistant",
  protocol = "data-stream", // "assistant-transport" when the backend has STREAM_PROTOCOL=assistant-transport
  onError,
  children,
}: {
  api?: string;
  protocol?: AssistantTransportProtocol;
  onError?: (error: Error) => void;
  children: ReactNode;
}) {
  const runtime = useAssistantTransportRuntime<State>({
    api,
    protocol,
    initialState: { messages: [] },
    converter,
    headers: {},
    onError,
  });
  return <AssistantRuntimeProvider runtime={runtime}>{children}</AssistantRuntimeProvider>;
}
